"""The one-click unsubscribe web app: ``app`` (WSGI, no database) and ``service`` (its database).

The rule: a GET never unsubscribes (link scanners and mail-security gateways
prefetch every URL in a message), it shows a page whose button POSTs; an
RFC 8058 one-click POST with a valid signed token unsubscribes at once.
"""
