"""The query demo as a person sees it: served by Voilà, clicked in headless Chromium, screenshotted.

    .venv/bin/python scripts/demo_screenshot.py                  # smoke profile -> reports/demo/demo_smoke.png
    .venv/bin/python scripts/demo_screenshot.py --profile cpu --query 12

What it does, in order:

1. finds the trained models of the profile's first database (the one ``06_demo`` shows) under
   ``--runs`` (default ``data/runs/<profile>``); when they are absent it runs the study first
   (``vitdsi study --profile P``, which skips notebooks that are up to date), or with
   ``--no-build`` stops and says what to run;
2. writes ``06_demo.ipynb`` into a scratch folder from the notebook's source ``notebooks/06_demo.py``
   (py:percent, read with jupytext as the runner reads it), with the profile's parameters injected
   (as the runner does), and serves it with Voilà on a free port of 127.0.0.1;
3. opens the page in headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright),
   waits for the widget, picks a test query in the dropdown, presses **Run**, and waits until
   the result grid shows that query's thumbnails;
4. checks in the page that every model returned results and that every thumbnail decoded,
   saves a screenshot (``--out``), and stops the server and its kernel.

It exits with status 1 and says why when any step fails. Needs ``apt-get install chromium``
(or ``VITDSI_CHROMIUM=/path/to/chromium``) and the ``playwright`` and ``voila`` packages of
requirements.txt; Playwright drives the installed Chromium, it downloads no browser.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's vitdsi_utils, not whichever one is installed
    sys.path.insert(0, str(ROOT))

from vitdsi_utils import settings  # noqa: E402
from vitdsi_utils.runner.profiles import load_profile, notebook_parameters  # noqa: E402
from vitdsi_utils.runner.run import StudyFailed, notebooks_dir, run_study, sync_sources  # noqa: E402
from vitdsi_utils.runner.sources import read_notebook  # noqa: E402

#: Debian's Chromium; VITDSI_CHROMIUM names another binary.
CHROMIUM = os.environ.get("VITDSI_CHROMIUM", "/usr/bin/chromium")
#: Flags that let Chromium run headless in a container without a sandbox, a GPU or network chatter.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The demo notebook's source (py:percent); Voilà gets an .ipynb written from it.
DEMO_NOTEBOOK = "06_demo.py"
VIEWPORT = {"width": 1280, "height": 900}


class DemoShotError(RuntimeError):
    """A step of the screenshot failed; the message says which and what to do."""


@dataclass
class DemoShot:
    """What the browser showed: the query's title, thumbnails per model, and the screenshot."""

    screenshot: Path
    query_title: str
    hits: dict[str, int] = field(default_factory=dict)
    relevant: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------
# What the demo needs
# ------------------------------------------------------------------------------------------
def demo_parameters(profile: str, runs: Path, out_dir: Path) -> dict:
    """The parameters ``06_demo`` declares, from the profile, with its RUNS_DIR and a scratch OUT_DIR."""
    params = load_profile(profile)
    params.update(OUT_DIR=str(out_dir.resolve()), RUNS_DIR=str(runs.resolve()))
    return notebook_parameters(notebooks_dir() / DEMO_NOTEBOOK, params)


def models_present(params: dict) -> bool:
    """Whether RUNS_DIR holds a trained model for the first database of the grid (the one the demo loads)."""
    from vitdsi_utils.data.database import build_database
    from vitdsi_utils.data.images import load_images
    from vitdsi_utils.runs import find_run_dir

    image_set = load_images(params["DATASET"], params["SIZE"], progress=False)
    db = build_database(image_set, params["NS"][0], id_scheme=params["ID_SCHEMES"][0], seed=params["SEEDS"][0])
    return find_run_dir(params["RUNS_DIR"], db) is not None


def ensure_models(profile: str, runs: Path, params: dict, *, build: bool) -> None:
    """Run the study when the demo's models are missing (or, without ``build``, say what to run)."""
    if models_present(params):
        return
    command = f"vitdsi study --profile {profile} --runs {runs}"
    if not build:
        raise DemoShotError(
            f"no trained models for the demo under {runs}; run `{command}` first, "
            "or leave out --no-build to let this script run it"
        )
    print(f"no trained models under {runs}: running the study first ({command})", flush=True)
    run_study(profile, runs_dir=runs)
    if not models_present(params):
        raise DemoShotError(f"the study finished but {runs} still holds no model for the demo's database")


def write_demo_notebook(params: dict, folder: Path) -> Path:
    """``folder/06_demo.ipynb``: the demo's source with ``params`` injected after its parameters cell, as papermill does."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    source = read_notebook(notebooks_dir() / DEMO_NOTEBOOK)  # the kernel this Python runs: "python3"
    notebook = parameterize_notebook(load_notebook_node(source), params)
    path = folder / Path(DEMO_NOTEBOOK).with_suffix(".ipynb").name
    nbformat.write(notebook, str(path))
    return path


# ------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def voila_server(notebook: Path, log: Path, *, timeout: float) -> Iterator[str]:
    """Serve ``notebook`` with Voilà on a free local port; yield its URL; stop it and its kernel at the end."""
    port = free_port()
    env = dict(os.environ)
    # the kernel imports this checkout's package, and one thread is enough for one query
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [
        sys.executable,
        "-m",
        "voila",
        str(notebook),
        "--no-browser",
        f"--port={port}",
        "--Voila.ip=127.0.0.1",
        "--Voila.port_retries=0",
        "--VoilaConfiguration.show_tracebacks=True",
    ]
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            command, cwd=notebook.parent, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise DemoShotError(f"Voilà exited with status {server.returncode}:\n{_tail(log)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise DemoShotError(f"Voilà did not listen on port {port} within {timeout:.0f} s:\n{_tail(log)}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/"
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """Stop the server and everything it started (its kernel) by signalling its process group."""
    if server.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def _tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(text[-lines:]) or "(no server output)"


# ------------------------------------------------------------------------------------------
# The browser
# ------------------------------------------------------------------------------------------
#: In the page: the results the widget shows now, per model, and whether every thumbnail decoded.
READ_RESULTS = """() => {
  const title = document.querySelector('.vitdsi-query b');
  const hits = [...document.querySelectorAll('figure.vitdsi-hit')];
  const byModel = {}, relevant = {};
  for (const hit of hits) {
    const model = hit.dataset.model;
    byModel[model] = (byModel[model] || 0) + 1;
    relevant[model] = (relevant[model] || 0) + (hit.dataset.relevant === 'true' ? 1 : 0);
  }
  const broken = hits.filter(h => { const img = h.querySelector('img');
                                    return !img || !img.complete || img.naturalWidth === 0; }).length;
  return {title: title ? title.textContent : null, hits: byModel, relevant, broken};
}"""


#: In the page: whether every result thumbnail has been decoded.
ALL_DECODED = """() => [...document.querySelectorAll('figure.vitdsi-hit img')]
                        .every(img => img.complete && img.naturalWidth > 0)"""
#: In the page: the bottom of the demo's results (px from the top) once every scrolled container is at its top.
DEMO_BOTTOM = """() => {
  for (const el of document.querySelectorAll('*')) { if (el.scrollTop) el.scrollTop = 0; }
  window.scrollTo(0, 0);
  return Math.ceil(document.querySelector('.vitdsi-demo').getBoundingClientRect().bottom);
}"""
MAX_HEIGHT = 4000  # px: a K = 20 grid of three models fits well within this


def capture_demo(url: str, screenshot: Path, *, query: int, timeout: float, chromium: str = CHROMIUM) -> DemoShot:
    """Open the demo at ``url``, pick test query ``query``, press Run, check the grid and screenshot it."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    timeout_ms = timeout * 1000
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT
        )
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url, wait_until="load", timeout=timeout_ms)
            dropdown = page.locator(".widget-dropdown select").first
            try:
                dropdown.wait_for(state="visible", timeout=timeout_ms)
            except PlaywrightError as error:
                raise DemoShotError(
                    f"the demo widget did not appear within {timeout:.0f} s (is the notebook "
                    f"failing? see the server log); page errors: {errors or 'none'}"
                ) from error
            options = dropdown.locator("option")
            count = options.count()
            if not 0 <= query < count:
                raise DemoShotError(f"--query {query} does not exist: the dropdown has test queries 0..{count - 1}")
            # ipywidgets writes the option's spaces as no-break spaces: '7:\xa0chain saw'
            label = " ".join(options.nth(query).inner_text().replace("\xa0", " ").split())
            dropdown.select_option(index=query)
            title = f"test query {label}"  # the results' heading: 'test query 7: chain saw'
            # the kernel confirms the choice in the status line before the search starts
            page.get_by_text(title, exact=True).first.wait_for(timeout=timeout_ms)
            page.get_by_role("button", name="Run").click()
            page.wait_for_function(
                """(title) => { const t = document.querySelector('.vitdsi-query b');
                                return t && t.textContent === title
                                    && document.querySelectorAll('figure.vitdsi-hit img').length > 0; }""",
                arg=title,
                timeout=timeout_ms,
            )
            with contextlib.suppress(PlaywrightError):  # thumbnails are data: URIs, decoded in a moment
                page.wait_for_function(ALL_DECODED, timeout=10_000)
            shown = page.evaluate(READ_RESULTS)
            if shown["title"] != title or not shown["hits"] or shown["broken"]:
                raise DemoShotError(
                    f"the result grid is wrong: {json.dumps(shown)} (expected results for {title!r} "
                    "from every model, every thumbnail decoded)"
                )
            # Voilà's page scrolls inside a container, so a "full page" shot is one viewport: grow the
            # viewport instead, down to the end of the result grid (the demo as a whole)
            bottom = page.evaluate(DEMO_BOTTOM)
            page.set_viewport_size(
                {"width": VIEWPORT["width"], "height": min(max(bottom + 24, VIEWPORT["height"]), MAX_HEIGHT)}
            )
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
        except Exception as error:
            failed = screenshot.with_name(f"{screenshot.stem}_failed.png")
            with contextlib.suppress(Exception):  # the page as it was, to see what went wrong
                failed.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(failed))
            what = str(error) if isinstance(error, DemoShotError) else f"{type(error).__name__}: {error}"
            raise DemoShotError(
                f"{what}\nthe page at the failure: {failed}; errors in the page: {errors or 'none'}"
            ) from error
        finally:
            context.close()
    return DemoShot(screenshot, title, shown["hits"], shown["relevant"], time.perf_counter() - start)


# ------------------------------------------------------------------------------------------
# The whole thing
# ------------------------------------------------------------------------------------------
def demo_screenshot(
    profile: str = "smoke",
    *,
    runs: Path | None = None,
    out: Path | None = None,
    query: int = 7,
    build: bool = True,
    timeout: float = 180.0,
    chromium: str = CHROMIUM,
) -> DemoShot:
    """Build what is missing, serve the demo, click through one query, screenshot it; see the module doc."""
    if not Path(chromium).is_file():
        raise DemoShotError(
            f"no Chromium at {chromium}: install it with `apt-get install -y chromium` or pass --chromium PATH"
        )
    runs = Path(runs) if runs is not None else settings.data_dir() / "runs" / profile
    out = Path(out) if out is not None else settings.reports_dir() / "demo" / f"demo_{profile}.png"
    try:  # an edit of 06_demo.ipynb made in JupyterLab without jupytext reaches the source first
        sync_sources([notebooks_dir() / DEMO_NOTEBOOK])
    except StudyFailed as error:
        raise DemoShotError(str(error)) from error
    with tempfile.TemporaryDirectory(prefix="vitdsi-demo-") as scratch:
        scratch = Path(scratch)
        params = demo_parameters(profile, runs, scratch / "report")
        ensure_models(profile, runs, params, build=build)
        notebook = write_demo_notebook(params, scratch)
        log = scratch / "voila.log"
        with voila_server(notebook, log, timeout=timeout) as url:
            print(f"Voilà serves the demo at {url}; opening it in {chromium}", flush=True)
            try:
                return capture_demo(url, out, query=query, timeout=timeout, chromium=chromium)
            except Exception as error:
                raise DemoShotError(f"{error}\n--- Voilà's log (last lines) ---\n{_tail(log)}") from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile", default="smoke", help="the study profile whose models the demo loads (default smoke)"
    )
    parser.add_argument("--runs", type=Path, default=None, help="trained models (default data/runs/<profile>)")
    parser.add_argument(
        "--out", type=Path, default=None, help="screenshot PNG (default reports/demo/demo_<profile>.png)"
    )
    parser.add_argument("--query", type=int, default=7, help="the test query to pick in the dropdown (default 7)")
    parser.add_argument(
        "--no-build",
        dest="build",
        action="store_false",
        help="fail instead of running the study when the models are missing",
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each step (default 180)")
    parser.add_argument("--chromium", default=CHROMIUM, help=f"the Chromium binary (default {CHROMIUM})")
    args = parser.parse_args(argv)
    try:
        shot = demo_screenshot(
            args.profile,
            runs=args.runs,
            out=args.out,
            query=args.query,
            build=args.build,
            timeout=args.timeout,
            chromium=args.chromium,
        )
    except DemoShotError as error:
        print(f"demo_screenshot: {error}", file=sys.stderr)
        return 1
    summary = ", ".join(f"{model} {shot.relevant[model]}/{n} relevant" for model, n in shot.hits.items())
    print(f"{shot.query_title}: {summary}; screenshot {shot.screenshot} ({shot.seconds:.1f} s in the browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
