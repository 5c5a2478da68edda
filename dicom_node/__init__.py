"""The DICOM storage SCP: receives radiographs, stores them as received and queues them.

Modules:
- ``contexts``: the SOP classes and transfer syntaxes the node accepts (its conformance).
- ``validate``: the checks a received object passes before it is stored.
- ``storage``: paths built from validated UIDs and the atomic, durable write.
- ``handlers``: the C-ECHO / C-STORE / association event handlers.
- ``scp``: building the Application Entity from ``Settings`` and running it.
"""
