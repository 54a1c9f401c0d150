"""What comes back: bounces, complaints and mailto unsubscribes, and what they do to subscribers.

``classify`` reads one message (pure), ``intake`` records it, ``maildir`` is
``bounce scan``, ``recipients`` applies thresholds, complaints and
unsubscribes (also for the send worker's 5.1.x replies and the unsubscribe
app). The rule: only signed evidence acts. A report changes a subscriber
only when a VERP address, signed Message-ID or unsubscribe token ties it to
one of our messages; anything else is stored as unverified and changes nothing.
"""
