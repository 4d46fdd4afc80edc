"""JWT verification: pinned algorithms, required claims, verified tokens cached."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import jwt

from outbox.settings import Settings


class AuthError(Exception):
    """The token is missing or not acceptable; the message says why."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    is_admin: bool
    expires_at: float | None  # unix time, None when the token has no `exp`


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
        elif settings.jwt_secret and not asymmetric:
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
                known[name].prepare_key(self._key)
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                problems.append(f"{name}: {exc}")
            else:
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
        if principal.expires_at is not None and principal.expires_at + self._leeway < time.time():
            raise AuthError("token expired")
        return principal

    def _verify(self, token: str) -> Principal:
        required = ["exp"] if self._require_exp else []
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
        exp = claims.get("exp")
        return Principal(
            user_id=str(subject),
            is_admin=claims.get(self._admin_claim) == "admin",
            expires_at=float(exp) if isinstance(exp, int | float) else None,
        )


def mint_token(
    secret: str, subject: str, *, admin: bool = False, ttl: float = 3600.0, role_claim: str = "role"
) -> str:
    """An HS256 token for development and tests (`outbox token`)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + int(ttl)}
    if admin:
        claims[role_claim] = "admin"
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization header must be 'Bearer <token>'")
    return token.strip()
