"""Everything HTTP: the aiohttp app and its middlewares, the routes and their handlers, request
bodies and validation, the connection listener, event streams and their tokens, the web page,
the OpenAPI document and the docs page.

May use: jobs (the manager, the listing), runs only through jobs, state, and the shared base
(endpoints, scripts, settings, images, fields, errors). Never setup, cli or server."""
