"""What the gateway and the central office must agree on, version 1 of the wire protocol.

docs/protocol.md is the normative description; this package is its implementation, and
both sides import it (it imports neither ``agent`` nor ``provisioning``):

- ``ids``: identifier and key-id patterns, card-id normalisation;
- ``topics``: the topic tree and how a topic is read back;
- ``messages``: the message models (pydantic) and their parsing;
- ``signing``: envelopes, Ed25519 signatures bound to the topic, trusted keys;
- ``chain``: the canonical event hash and the rules of the event chain;
- ``hashing``: keyed hashing of cards and permits, the site key format;
- ``bundles``: the request a new gateway writes for the office and the office's response;
- ``schemas``: the JSON Schema export (``python -m protocol.schemas docs/schemas``).
"""

PROTOCOL = "pg/v1"
"""The topic prefix and version tag of this protocol."""
