"""JWT verification: pinned algorithms, required claims, verified tokens cached."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from outbox.settings import Settings

PRIVATE_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class AuthError(Exception):
    """The token is missing or not acceptable; the message says why."""


# RFC 7518 §3.2: an HS256 key at least as long as the hash; shorter ones are guessable.
MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    is_admin: bool
    expires_at: float | None  # unix time, None when the token has no `exp`
    issued_at: float | None = None  # unix time of `iat`, when the token has one


class TokenVerifier:
    def __init__(self, settings: Settings, *, cache_size: int = 4096) -> None:
        self._algorithms = list(settings.jwt_algorithms)
        known = jwt.algorithms.get_default_algorithms()
        unknown = [name for name in self._algorithms if name not in known or name == "none"]
        if unknown or not self._algorithms:
            raise ValueError(
                f"OUTBOX_JWT_ALGORITHMS: unknown or refused algorithm(s) {', '.join(unknown)}"
                f" (choose from {', '.join(sorted(set(known) - {'none'}))})"
            )
        asymmetric = any(not alg.upper().startswith("HS") for alg in self._algorithms)
        if asymmetric and any(alg.upper().startswith("HS") for alg in self._algorithms):
            raise ValueError("OUTBOX_JWT_ALGORITHMS must not mix HS* with public-key algorithms")
        if asymmetric and settings.jwt_public_key:
            # A PEM in an environment variable often arrives with literal "\n" escapes.
            self._key: str = settings.jwt_public_key.replace("\\n", "\n").strip()
            self._check_public_key()
            if not settings.jwt_audience:
                # An identity provider signs every application's tokens with this key: only
                # the audience tells ours from another's (whose `role: admin` is not ours).
                raise ValueError(
                    "OUTBOX_JWT_AUDIENCE is required with OUTBOX_JWT_PUBLIC_KEY: without it a"
                    " token the same issuer made for another application would be accepted"
                )
        elif settings.jwt_secret and not asymmetric:
            if len(settings.jwt_secret.encode()) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"OUTBOX_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes (got"
                    f" {len(settings.jwt_secret.encode())}); e.g. `openssl rand -hex 32`"
                )
            self._key = settings.jwt_secret
        else:
            raise ValueError(
                "set OUTBOX_JWT_SECRET (HS* algorithms) or OUTBOX_JWT_PUBLIC_KEY"
                " (RS*/ES*/PS*/EdDSA)"
                f" to match OUTBOX_JWT_ALGORITHMS={','.join(self._algorithms)}"
            )
        self._audience = settings.jwt_audience or None
        self._issuer = settings.jwt_issuer or None
        self._require_exp = settings.jwt_require_exp
        self._admin_claim = settings.jwt_admin_claim
        self._admin_value = settings.jwt_admin_value
        self._max_age = settings.jwt_max_age or None
        self._leeway = settings.jwt_leeway
        # Signature checks are a large share of a request's CPU: remember the
        # tokens that passed, and re-check only their expiry on a hit.
        self._verify_cached = functools.lru_cache(maxsize=cache_size)(self._verify)

    def _check_public_key(self) -> None:
        """Refuse to start with a key that no configured algorithm can use."""
        known = jwt.algorithms.get_default_algorithms()
        problems = []
        for name in self._algorithms:
            try:
                prepared = known[name].prepare_key(self._key)
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                problems.append(f"{name}: {exc}")
                continue
            if isinstance(prepared, PRIVATE_KEY_TYPES):
                # PyJWT takes a private key here, then fails every verification.
                raise ValueError(
                    "OUTBOX_JWT_PUBLIC_KEY holds a private key: give its public half"
                    " (openssl pkey -pubout); the private key must stay with the issuer"
                )
            return
        raise ValueError(
            "OUTBOX_JWT_PUBLIC_KEY is not a public key for "
            + ", ".join(self._algorithms)
            + " ("
            + "; ".join(problems)
            + ")"
        )

    def authenticate(self, token: str) -> Principal:
        principal = self._verify_cached(token)
        now = time.time()
        if principal.expires_at is not None and principal.expires_at + self._leeway < now:
            raise AuthError("token expired")
        if self._max_age is not None:
            if principal.issued_at is None:
                raise AuthError("token lacks the 'iat' claim")
            if now - principal.issued_at > self._max_age + self._leeway:
                raise AuthError("token too old (issued more than OUTBOX_JWT_MAX_AGE ago)")
        return principal

    def _verify(self, token: str) -> Principal:
        required = ["exp"] if self._require_exp else []
        if self._max_age is not None:
            required.append("iat")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": required,
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                    "verify_sub": False,  # checked below: a numeric `sub` is accepted
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError("token audience not accepted") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthError("token issuer not accepted") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise AuthError("token algorithm not accepted") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("token signature invalid") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the '{exc.claim}' claim") from exc
        except jwt.DecodeError as exc:
            # Its message is PyJWT's internals ("'utf-8' codec can't decode byte …").
            raise AuthError("malformed token") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"token invalid: {exc}") from exc
        subject = claims.get("sub")
        if (
            isinstance(subject, bool)
            or not isinstance(subject, str | int)
            or subject == ""
            or (isinstance(subject, str) and "\x00" in subject)
        ):
            raise AuthError("token lacks a 'sub' claim (a string or a number)")
        exp, iat = claims.get("exp"), claims.get("iat")
        return Principal(
            user_id=str(subject),
            is_admin=claims.get(self._admin_claim) == self._admin_value,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
            issued_at=float(iat) if isinstance(iat, int | float) else None,
        )


def mint_token(
    secret: str,
    subject: str,
    *,
    admin: bool = False,
    ttl: float = 3600.0,
    role_claim: str = "role",
    admin_value: str = "admin",
) -> str:
    """An HS256 token for development and tests (`outbox token`)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + int(ttl)}
    if admin:
        claims[role_claim] = admin_value
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization header must be 'Bearer <token>'")
    return token.strip()
