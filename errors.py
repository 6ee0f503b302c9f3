"""Errors the proxy answers with, in the JSON shape OpenAI clients parse.

The official SDKs read `{"error": {"message", "type", "param", "code"}}`
and pick an exception class by status, so a student's code handles our
refusals exactly like OpenAI's own.
"""

from flask import jsonify


class ProxyError(Exception):
    """A request the proxy answers itself, without (further) upstream help."""

    status = 500
    error_type = "server_error"
    code = None
    # Retrying cannot help with most of our refusals; tell the SDKs so.
    should_retry = False

    def __init__(self, message, *, code=None, param=None, headers=None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.param = param
        self.headers = headers or {}


class BadRequest(ProxyError):
    """The request is malformed."""

    status = 400
    error_type = "invalid_request_error"


class MissingKey(ProxyError):
    """No proxy key came with the request, or it is not one we know."""

    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    """The key is known but may not do this."""

    status = 403
    error_type = "permission_error"


class NotFound(ProxyError):
    """No such route on the proxy."""

    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class TooLarge(ProxyError):
    """The request body is over a size limit."""

    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(ProxyError):
    """The body is in a format the proxy does not forward."""

    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class QuotaExceeded(ProxyError):
    """A token budget is used up; retrying before it resets cannot help."""

    status = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class RateLimited(ProxyError):
    """Too many requests for now; retrying after Retry-After will work."""

    status = 429
    error_type = "requests"
    code = "rate_limit_exceeded"
    should_retry = True


class UpstreamError(ProxyError):
    """The upstream could not be reached or refused the proxy itself."""

    status = 502
    error_type = "server_error"
    code = "upstream_unavailable"
    should_retry = True


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time."""

    status = 504
    code = "upstream_timeout"


def error_body(message, error_type, code=None, param=None):
    """Return the OpenAI error object as a dict."""
    return {
        "error": {"message": message, "type": error_type, "param": param, "code": code}
    }


def error_response(error):
    """Turn a ProxyError into a Flask JSON response."""
    body = error_body(error.message, error.error_type, error.code, error.param)
    response = jsonify(body)
    response.status_code = error.status
    response.headers["x-should-retry"] = "true" if error.should_retry else "false"
    response.headers.update(error.headers)
    return response
