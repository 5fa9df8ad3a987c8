"""Optional middleware for minismtp: filters and limits (imported as minismtp.contrib).

One middleware per module, each built as ``Middleware(app, **options)`` and added with
``app.add_middleware(Middleware, **options)``; each class docstring says at which stage it
acts (connect, helo, mail, rcpt, data) and what it replies:

- :mod:`~minismtp.contrib.access` -- ``ClientAccess``: allow/deny CIDR lists, ``554 5.7.1``;
- :mod:`~minismtp.contrib.ratelimit` -- ``ConnectionLimit``: per client, ``421 4.7.0``;
- :mod:`~minismtp.contrib.early_talker` -- ``EarlyTalker``: pregreet test, ``554 5.5.1``;
- :mod:`~minismtp.contrib.domains` -- ``RecipientDomainFilter`` (``550 5.7.1 Relay access
  denied``) and ``SenderDomainFilter`` (``550 5.7.1``);
- :mod:`~minismtp.contrib.size` -- ``MessageSizeLimit``: ``SIZE n``, ``552 5.3.4``;
- :mod:`~minismtp.contrib.greylist` -- ``Greylist``: ``451 4.7.1``.
"""
