"""What every test tier builds on: the test database and config (env), quick
set-ups and waits (helpers), an aiosmtpd server that records (smtp_server), a
TCP proxy that can cut a link (proxy), and the simulated cluster (cluster:
private mariadbd, Galera, role processes on the demo's process management)."""
