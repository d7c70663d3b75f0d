"""The office's comparison with the police population registry, and queries for a case
(docs/registry.md, docs/privacy.md).

- ``registry``: reading an export (CSV in any of the encodings Chinese offices write,
  .xlsx), its columns, a mapping file, malformed rows with their line numbers;
- ``findings``: the comparison itself (``Reconciler``): the registry staged, the findings
  computed by the database (``OfficeDatabase.reconcile_session``), handed out in pages;
- ``outputs`` and ``schema``: the terminal summary, CSV and JSON (and the JSON Schema);
- ``charts``: the self-contained HTML page with its charts (matplotlib, inline SVG);
- ``cases``: one person's movements, only for a case, recorded (``Cases``);
- ``cli``: ``permitgate-central reconcile``, ``retention`` and ``case``.

Retention itself is ``provisioning.retention``.
"""
