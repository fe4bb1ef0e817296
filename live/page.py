"""The browser page (`web/`): `GET /` is its index, `GET /web/...` its scripts and styles.

Plain files, no build step. They are found next to the packages (a source checkout or an editable
install) or in the working directory (the Docker image copies `web/` into its WORKDIR and installs
the packages into site-packages).
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

logger = logging.getLogger(__name__)

# The page loads nothing from elsewhere; the policy makes the browser hold it to that, and keeps
# an injected script (were one ever to get in) from calling out.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; media-src 'self' blob: mediastream:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def find_web_dir() -> Path | None:
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        candidate = root / "web"
        if (candidate / "index.html").is_file():
            return candidate
    return None


def add_page_routes(app: web.Application, web_dir: Path | None = None) -> None:
    folder = web_dir or find_web_dir()
    if folder is None:
        logger.warning("web/ not found next to the service or in the working directory: no page")
        return
    index = folder / "index.html"

    async def get_index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(
            index,
            headers={
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "Cache-Control": "no-cache",
            },
        )

    app.router.add_get("/", get_index)
    # No directory listing, and no symlinks followed out of the folder.
    app.router.add_static("/web/", folder, show_index=False, follow_symlinks=False)
