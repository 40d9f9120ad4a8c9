"""A screenshot of a flow run's graph, taken from Prefect's own UI (docs/img/flow-run-graph.png).

    python scripts/flow_graph_screenshot.py --ui http://127.0.0.1:4200 --flow-run-id <uuid> \
        [--out docs/img/flow-run-graph.png] [--layout "Dependency grid"] [--size 1600x1000]

Why a browser: the graph is the evidence that tasks pass each other values (issue 14: Prefect
draws a task's `task_inputs` as an edge, so generate-k -> rewards-k -> teacher-k -> update-k ->
checkpoint-k appear only when each task received what the previous one returned). Drawing the
API's graph ourselves would show what we think Prefect records; the UI shows what it draws.

Requirements (a dev script, not run in CI, not a project dependency):
- a Prefect server started with its UI (`prefect server start`, not flows/server.py, which passes
  `--no-ui`) holding the flow run, with PREFECT_UI_API_URL=http://<host>:<port>/api in its
  environment when it does not listen on the default port (else the UI asks port 4200); its id
  from `prefect flow-run ls` or the UI;
- Debian's Chromium (`apt-get install chromium`, /usr/bin/chromium) and the `playwright` package
  in a venv of its own (`pip install playwright`; never `playwright install`: it downloads a
  browser, and we drive the system one through `executable_path`).
The graph is a WebGL canvas; headless Chromium without a GPU draws it with SwiftShader, which
recent Chromium enables only with --enable-unsafe-swiftshader (harmless here: a local page).

The page is opened at --size, the layout chosen in the graph's options menu, the graph put in
full screen (its own button) and recentred, and the shot taken once two consecutive frames agree
(the graph animates nodes into place).
"""

from __future__ import annotations

import argparse
import time

from playwright.sync_api import Page, sync_playwright

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # a closed network refuses Chromium's background connections, many at a time
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
]
LAYOUTS = ["Temporal dependency", "Temporal sequence", "Dependency grid", "Sequential grid",
           "Comparative duration"]


def _wait_still(page: Page, timeout_s: float) -> None:
    """Return once two screenshots 1 s apart are identical (or after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    previous = page.screenshot()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        current = page.screenshot()
        if current == previous:
            return
        previous = current


def screenshot(ui: str, flow_run_id: str, out: str, *, layout: str, width: int, height: int,
               chromium: str, timeout_s: float) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
            page.wait_for_selector(".run-graph canvas", timeout=timeout_s * 1000)
            page.get_by_role("button", name="Run Graph Options").click()
            page.get_by_text(layout, exact=True).click()
            page.keyboard.press("Escape")  # close the options menu
            page.get_by_title("Toggle fullscreen (f)").click()
            page.get_by_title("Recenter graph (c)").click()
            page.mouse.move(0, 0)  # no hover highlight in the shot
            _wait_still(page, timeout_s)
            page.screenshot(path=out)
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ui", required=True, help="the UI, e.g. http://127.0.0.1:4200")
    parser.add_argument("--flow-run-id", required=True)
    parser.add_argument("--out", default="docs/img/flow-run-graph.png")
    parser.add_argument("--layout", default="Dependency grid", choices=LAYOUTS)
    parser.add_argument("--size", default="1600x1000", help="viewport WIDTHxHEIGHT in CSS pixels")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    screenshot(args.ui, args.flow_run_id, args.out, layout=args.layout, width=width, height=height,
               chromium=args.chromium, timeout_s=args.timeout_s)
    print(args.out)


if __name__ == "__main__":
    main()
