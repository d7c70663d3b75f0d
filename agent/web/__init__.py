"""The landlord page: a small web application on the gateway, in a process of its own.

Landlords sign in on a phone, enroll tenants at the door and move them out; installers
see the gateway's health. The page holds neither the site key nor write access to the
agent's stores: every change goes to the agent as a request on its control socket
(``web.sock``, ``agentlink``), and the agent alone captures taps, hashes, seals and
records. The page keeps only its own accounts and sessions (``db``, ``web.db``).

Modules: ``settings`` (what the server process is told), ``agentlink`` (the socket
client), ``db`` (accounts, sessions, back-off, audit outbox), ``auth`` (passwords,
sign-in codes, back-off policy), ``security`` (Host allowlist, headers, origin checks),
``i18n`` (Chinese and English), ``app`` (the application and its shared helpers),
``views_*`` (the pages), ``serve`` (the server process), ``cli`` (``permitgate-web``).

The serving process never imports pydantic or the agent's configuration models: ``cli``
validates the configuration with them, then replaces itself (``exec``) with ``serve``,
which gets plain settings; that keeps the page at about 40 MB on a Pi (docs/landlord.md).
"""
