"""The reading room: a web interface of the node (series list, detail, contrast tuner, report).

Only :mod:`dicom_node.web.settings` is imported by the configuration loader; the ASGI app
(:mod:`dicom_node.web.app`, Starlette + Jinja2, served by uvicorn) is imported when
``[web] enabled = true``.
"""
