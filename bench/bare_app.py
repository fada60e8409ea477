"""The peer of the warm-path benchmark: a Falcon app whose POST /run/noop
answers `null` at once, served by gunicorn with the worker's settings."""

import falcon


class Noop:
    def on_post(self, req, resp, name):
        req.bounded_stream.read()
        resp.data = b"null"
        resp.content_type = falcon.MEDIA_JSON


app = falcon.App()
app.add_route("/run/{name}", Noop())
