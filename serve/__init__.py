"""vdiff's web app and HTTP API: a thin layer over `VideoPipeline`.

    ./launch.sh serve --checkpoint DIR [--host 127.0.0.1] [--port 7860]     (python -m serve --help)

    serve.app         the Gradio Blocks page and the `/generate` endpoint (`build_app`, `serve`)
    serve.api         the `/v1/videos` job API on the same app and pool (`add_api`; client: vdiff.client)
    serve.jobs        the API's job records: status, progress, event log (`JobStore`, `VideoJob`)
    serve.worker      bounded request queue, one pipeline per device, bounded output area (`WorkerPool`)
    serve.validation  what a request may ask for, checked in one place (`Limits`, `validate_request`)

Importing this package loads nothing heavy and starts nothing.
"""
