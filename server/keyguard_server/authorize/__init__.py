"""Authorize: may this key do this, from this IP, now? The domain (``_domain``), the order of
checks as data (``_rules``) and the use case that runs it (``_authorizer``)."""
