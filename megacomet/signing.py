"""Signed subscriptions: the application decides who may read an id.

With a secret configured, every subscription carries ``exp`` (a unix time)
and ``sig``, the hex HMAC-SHA256 of ``ids + "|" + exp`` under the secret,
where ``ids`` is the id, or several ids sorted and joined with ",".  The
application computes it when it renders a page; the server only checks it.

Pure functions of their arguments: nothing here reads a clock it is not
given, keeps a secret, or logs one.
"""

import hashlib
import hmac

MAX_EXP_DIGITS = 12      # unix times up to the year 33658: anything longer is not one


def signed_text(ids, exp):
    return ("%s|%d" % (",".join(sorted(ids)), exp)).encode()


def signature(secret, ids, exp):
    """The hex signature of ``ids`` (a list of str) valid until ``exp``."""
    return hmac.new(secret, signed_text(ids, exp), hashlib.sha256).hexdigest()


def query(secret, ids, ttl, now):
    """The query string a subscription to ``ids`` carries for ``ttl`` seconds from ``now``."""
    exp = int(now) + ttl
    return "exp=%d&sig=%s" % (exp, signature(secret, ids, exp))


def refusal(secret, ids, exp_text, sig_text, now):
    """Why a subscription may not read ``ids`` (a reason for the 403), or None if it may."""
    if exp_text is None or sig_text is None:
        return "signed subscription required (exp and sig)"
    if not (0 < len(exp_text) <= MAX_EXP_DIGITS and exp_text.isascii() and exp_text.isdigit()):
        return "exp must be a unix time"
    exp = int(exp_text)
    if exp < now:
        return "subscription signature expired"
    if not hmac.compare_digest(sig_text.encode(), signature(secret, ids, exp).encode()):
        return "bad subscription signature"
    return None
