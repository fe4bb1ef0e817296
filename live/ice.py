"""ICE settings of the WebRTC endpoints (no aiortc import: settings and routes use it too)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IceSettings:
    servers: list[str] = field(default_factory=list)
    """stun: and turn: URLs; none by default, so no outside server is ever contacted."""
    username: str | None = None
    credential: str | None = None

    def link_headers(self) -> list[str]:
        """RFC 9725 §4.6: the ICE servers a client may use, as Link headers."""
        links = []
        for url in self.servers:
            link = f'<{url}>; rel="ice-server"'
            if url.startswith("turn") and self.username and self.credential:
                link += (
                    f'; username="{self.username}"; credential="{self.credential}"; '
                    'credential-type="password"'
                )
            links.append(link)
        return links
