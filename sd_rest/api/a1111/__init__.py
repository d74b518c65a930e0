"""AUTOMATIC1111's `/sdapi/v1` dialect: the routes its clients call (Open WebUI, SillyTavern,
webuiapi...), each request an ordinary sd-rest job submitted through the manager.

- errors.py: its two error shapes (FastAPI's 422, AUTOMATIC1111's own);
- request.py: reading a body the way its pydantic models do (types, defaults);
- images.py: its base64 images into the PNGs our endpoints take (resized like its default);
- translate.py: a request into our endpoint, parameters, uploads and notes;
- info.py: the `info` of an answer, from the job and its PNGs;
- catalog.py: options, models, samplers and the other lists, and progress;
- routes.py: the handlers.
"""
