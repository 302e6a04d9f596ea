"""`llamalens serve`: explore a model in the browser, and an OpenAI-compatible API beside it (docs/serve.md).

    commands/serve.py   the command: load the model, pick a token, bind 127.0.0.1, print the URL, run uvicorn
    serve/app.py        HTTP: the guard (Host, token, Origin, body size, CSP), the page, the page's JSON API
    serve/openai.py     /v1/completions, /v1/chat/completions, /v1/models
    serve/requests.py   JSON bodies -> typed specs, every field checked before the model sees it
    serve/explorer.py   the use-case layer: one worker thread owns the model's held context (core/held.py);
                        generations and branches are runs of kind "tree" (run/tree.py), saved branch by branch
    serve/stored.py     any stored run in the tree format; a stored sample adopted as a new tree's root
    serve/page/         the page: index.html, app.js, app.css (no build step, no external request)
"""
