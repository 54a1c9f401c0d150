"""SendSystem: a distributed, load-balanced bulk mail sender.

Four cron-started roles (sort balancer, sort worker, send balancer, send
worker) share one MariaDB database. See README.md and ARCHITECTURE.md.
"""

__version__ = "0.1.0"
