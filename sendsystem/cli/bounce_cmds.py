"""Bounce intake and the unsubscribe service (filled in by the bounce issue)."""
