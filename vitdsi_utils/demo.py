"""The query demo: pick a test image (or upload one), run every model on it, see the top-K side by side.

A *searcher* is any object with ``search(images, k) -> (scores, rows)`` for uint8 images
(Q, S, S, 3), returning (Q, k) arrays of scores (higher is better) and database rows
(:mod:`vitdsi_utils.retrieval.searchers` adapts every model of the study).

:class:`QueryDemo` keeps its logic in plain methods (``select_query``, ``use_upload``,
``set_k``, ``set_models``, ``run``), so it can be driven and checked without a browser; its
``widget`` wires ipywidgets to those same methods. After a run, ``last_html`` holds the
rendered results (one ``<figure data-model=... data-row=... data-relevant=...>`` per hit) and
:meth:`QueryDemo.result_figure` draws them with :func:`plots.result_grid`.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitdsi_utils.bovw import BoVW
from vitdsi_utils.data.database import Database
from vitdsi_utils.data.files import describe_read_error, load_image
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.ids.codec import IDCodec
from vitdsi_utils.ids.schemes import codec_for
from vitdsi_utils.reports.plots import IRRELEVANT_COLOR, RELEVANT_COLOR, UNKNOWN_COLOR, readable_class, result_grid
from vitdsi_utils.retrieval.searchers import BoVWSearcher, DSISearcher, Searcher
from vitdsi_utils.runs import DSI_MODEL_FILES, find_run_dir, run_name
from vitdsi_utils.training.checkpoint import load_model

#: Any aspect ratio is accepted for an uploaded image: it is centre-cropped like the database images.
UPLOAD_ASPECT_RANGE = (1e-6, 1e6)


THUMBNAIL_PX = 72  # displayed side of a result thumbnail in the HTML grid


GALLERY_QUERIES = 60  # test queries shown in the thumbnail strip (all are in the dropdown)


def thumbnail_uri(image: np.ndarray, px: int | None = None) -> str:
    """A uint8 image (S, S, 3) as a ``data:image/png;base64,...`` URI, shrunk to ``px`` when larger."""
    thumbnail = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if px is not None and thumbnail.width > px:
        # the page only shows px pixels; sending 160 px images would make the HTML ~10x larger
        thumbnail = thumbnail.resize((px, px), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(image: np.ndarray, border: str, px: int = THUMBNAIL_PX) -> str:
    # pixelated scaling keeps 32 px digits crisp when the browser enlarges them
    return (
        f'<img src="{thumbnail_uri(image, px)}" width="{px}" height="{px}" '
        f'style="image-rendering:pixelated;border:3px solid {border};display:block">'
    )


class QueryDemo:
    """Interactive retrieval over one database: a query, the checked models, their top-K results."""

    def __init__(
        self,
        db: Database,
        models: dict[str, Searcher],
        *,
        query_role: str = "test",
        k: int = 10,
        max_k: int = 20,
    ):
        if not models:
            raise ValueError("QueryDemo needs at least one model: {name: searcher}")
        self.db, self.models, self.max_k = db, dict(models), max_k
        self._widget = None  # built on first use of .widget; the methods below work without it
        self.query_images, self.query_labels = db.split(query_role)
        self.index_images, self.index_labels = db.split("index")
        # label sets as (n, C) bool: one class each for ImageNet-like data, several for COCO
        self.query_sets, self.index_sets = db.multi_hot(query_role), db.multi_hot("index")
        self.query_names = [
            " + ".join(readable_class(db.classes[j]) for j in np.flatnonzero(labels)) for labels in self.query_sets
        ]
        if len(self.query_images) == 0:
            raise ValueError(f"the database has no {query_role!r} queries to choose from")
        self.size = int(db.settings["size"])
        self.k = 1
        self.set_k(k)
        self.selected = list(self.models)
        self.query_image: np.ndarray = self.query_images[0]
        self.query_label: int | None = int(self.query_labels[0])  # primary label for multi-label data
        self.query_set: np.ndarray | None = self.query_sets[0]  # (C,) bool; None for an upload
        self.query_title = ""
        self.results: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        self.last_html = ""
        self.select_query(0)

    # -- state -----------------------------------------------------------------------------
    def select_query(self, i: int) -> None:
        """Make test query ``i`` the query (its labels are known, so relevance can be marked)."""
        if not 0 <= i < len(self.query_images):
            raise IndexError(f"query {i} does not exist; choose 0..{len(self.query_images) - 1}")
        self.query_image, self.query_label = self.query_images[i], int(self.query_labels[i])
        self.query_set = self.query_sets[i]
        self.query_title = f"test query {i}: {self.query_names[i]}"
        if self._widget is not None and self._query_box.value != i:
            self._query_box.value = i

    def use_upload(self, content: bytes, name: str = "upload.png") -> None:
        """Make an uploaded image file the query, preprocessed like the database (centre square, resized)."""
        suffix = Path(name).suffix or ".png"
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"query{suffix}"
            path.write_bytes(content)
            try:
                image = load_image(path, self.size, aspect_range=UPLOAD_ASPECT_RANGE)
            except Exception as error:  # PIL raises several types for a file that is not an image
                reason = describe_read_error(error)
                raise ValueError(f"could not read {name!r} as an image ({reason}); upload a JPEG or PNG") from error
        self.query_image, self.query_label, self.query_set = image, None, None
        self.query_title = f"uploaded: {name}"

    def set_k(self, k: int) -> None:
        """Return the top ``k`` results per model (1..max_k)."""
        if not 1 <= int(k) <= self.max_k:
            raise ValueError(f"K must lie in 1..{self.max_k}, got {k}")
        self.k = int(k)
        if self._widget is not None and self._k_slider.value != self.k:
            self._k_slider.value = self.k

    def set_models(self, names: list[str]) -> None:
        """Run only these models (in the order of ``models``)."""
        unknown = sorted(set(names) - set(self.models))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; the demo has {list(self.models)}")
        self.selected = [n for n in self.models if n in names]
        if self._widget is not None:
            for name, box in self._checkboxes.items():
                box.value = name in self.selected

    # -- search ----------------------------------------------------------------------------
    def run(self) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
        """Search the query with every selected model: name -> (rows (k,), scores (k,), latency_ms)."""
        self.results = {}
        query = self.query_image[None]  # (1, S, S, 3)
        for name in self.selected:
            start = time.perf_counter()
            scores, rows = self.models[name].search(query, self.k)
            latency_ms = 1000 * (time.perf_counter() - start)
            rows, scores = np.asarray(rows)[0], np.asarray(scores)[0]
            keep = rows >= 0  # a decoder may return fewer valid IDs than asked for
            self.results[name] = (rows[keep], scores[keep], latency_ms)
        self.last_html = self.render_html()
        if self._widget is not None:
            self._result_html.value = self.last_html
        return self.results

    def is_relevant(self, row: int) -> bool | None:
        """Whether database row ``row`` shares the query's class, or one of its labels if multi-label (None for an upload)."""
        return None if self.query_set is None else bool((self.index_sets[row] & self.query_set).any())

    # -- rendering -------------------------------------------------------------------------
    def render_html(self) -> str:
        """The query and each model's results as HTML thumbnails, relevant ones framed green with a check mark."""
        parts = [
            '<div class="vitdsi-demo" style="font-family:sans-serif;font-size:12px">',
            f'<div class="vitdsi-query"><b>{html.escape(self.query_title)}</b>'
            f"{_img(self.query_image, '#000', 96)}</div>",
        ]
        for name, (rows, scores, latency_ms) in self.results.items():
            hits = sum(bool(self.is_relevant(r)) for r in rows)
            summary = f"{latency_ms:.1f} ms" + ("" if self.query_label is None else f", {hits}/{len(rows)} relevant")
            parts.append(
                f'<div class="vitdsi-model" data-model="{html.escape(name)}" style="margin-top:8px">'
                f"<b>{html.escape(name)}</b> ({summary})"
                '<div style="display:flex;flex-wrap:wrap;gap:4px">'
            )
            for rank, (row, score) in enumerate(zip(rows, scores), start=1):
                relevant = self.is_relevant(int(row))
                color = UNKNOWN_COLOR if relevant is None else RELEVANT_COLOR if relevant else IRRELEVANT_COLOR
                mark = "" if relevant is None else ("&#10003;" if relevant else "&#10007;")
                flag = "unknown" if relevant is None else str(relevant).lower()
                parts.append(
                    f'<figure class="vitdsi-hit" data-model="{html.escape(name)}" data-row="{int(row)}" '
                    f'data-relevant="{flag}" style="margin:0;text-align:center">{_img(self.index_images[row], color)}'
                    f"<figcaption>#{rank} {score:.2f} {mark}</figcaption></figure>"
                )
            parts.append("</div></div>")
        parts.append("</div>")
        return "".join(parts)

    def result_figure(self):
        """The last run as a matplotlib Figure (:func:`plots.result_grid`), e.g. to save as PNG."""
        if not self.results:
            raise RuntimeError("nothing to draw yet: call run() first")
        rows_per_model = {
            name: [(self.index_images[r], float(s), self.is_relevant(int(r))) for r, s in zip(rows, scores)]
            for name, (rows, scores, _) in self.results.items()
        }
        notes = {name: f"{latency:.1f} ms" for name, (_, _, latency) in self.results.items()}
        return result_grid(self.query_image, rows_per_model, query_title=self.query_title, notes=notes)

    # -- widgets ---------------------------------------------------------------------------
    @property
    def widget(self):
        """The ipywidgets interface (built on first use): query picker, upload, models, K, Run, results."""
        if self._widget is None:
            self._widget = self._build_widget()
        return self._widget

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _gallery_html(self) -> str:
        """A scrolling strip of the first GALLERY_QUERIES test queries, numbered as in the dropdown."""
        cells = [
            f'<div style="text-align:center;font-size:10px">{_img(image, "#ccc", 48)}{i}</div>'
            for i, image in enumerate(self.query_images[:GALLERY_QUERIES])
        ]
        more = len(self.query_images) - GALLERY_QUERIES
        note = f"<div style='font-size:10px'>... and {more} more in the dropdown</div>" if more > 0 else ""
        return (
            '<div style="display:flex;gap:3px;overflow-x:auto;max-width:100%;padding-bottom:4px">'
            + "".join(cells)
            + "</div>"
            + note
        )

    def _build_widget(self):
        import ipywidgets as widgets

        options = [(f"{i}: {name}", i) for i, name in enumerate(self.query_names)]
        self._query_box = widgets.Dropdown(options=options, value=0, description="test query")
        self._upload = widgets.FileUpload(accept="image/*", multiple=False, description="your image")
        self._checkboxes = {
            n: widgets.Checkbox(value=n in self.selected, description=n, indent=False) for n in self.models
        }
        self._k_slider = widgets.IntSlider(value=self.k, min=1, max=self.max_k, description="K")
        self._run_button = widgets.Button(description="Run", button_style="primary", icon="search")
        self._status = widgets.HTML()
        self._result_html = widgets.HTML(value=self.last_html)

        def on_query(change):
            self.select_query(change["new"])
            self._status.value = html.escape(self.query_title)

        def on_upload(change):
            files = change["new"]
            if not files:
                return
            item = files[-1]
            try:
                self.use_upload(bytes(item["content"]), item["name"])
                self._status.value = html.escape(self.query_title)
            except ValueError as error:
                self._status.value = f'<span style="color:{IRRELEVANT_COLOR}">{html.escape(str(error))}</span>'

        def on_run(_):
            self._status.value = "searching ..."
            self.set_models([n for n, box in self._checkboxes.items() if box.value])
            self.run()
            self._status.value = html.escape(self.query_title)

        self._query_box.observe(on_query, names="value")
        self._upload.observe(on_upload, names="value")
        self._k_slider.observe(lambda change: self.set_k(change["new"]), names="value")
        self._run_button.on_click(on_run)
        return widgets.VBox(
            [
                widgets.HTML(self._gallery_html()),
                widgets.HBox([self._query_box, self._upload]),
                widgets.HBox(list(self._checkboxes.values())),
                widgets.HBox([self._k_slider, self._run_button]),
                self._status,
                self._result_html,
            ]
        )

    # -- construction from a study's outputs -------------------------------------------------
    @classmethod
    def from_run_dir(
        cls,
        path: str | Path,
        db: Database,
        *,
        bovw_words: int = 200,
        profile: str = "smoke",
        device: str = "auto",
        codec: IDCodec | None = None,
        ids: str | None = None,
        **kwargs: Any,
    ) -> QueryDemo:
        """A demo with BoVW (fitted now) and the DSI models trained for ``db`` by the study (on ``device``).

        ``path`` is the run folder itself, the runs folder holding ``<run_name(db)>/``, or a
        profile's report folder (its ``tables/indexing_runs.csv`` names the run folders).
        ``codec`` is the IDs the models must have been trained with (default: the database's
        dense IDs); for another scheme pass it with ``ids``, the name in its run folder
        (``IDAssignment.tag``).
        """

        run = find_run_dir(path, db, ids)
        found = {name: run / file for name, file in DSI_MODEL_FILES if run is not None and (run / file).is_file()}
        if not found:
            s = db.settings
            options = f" --dataset {s['source']}" + (
                f" --root {s['root']}" if s["source"] == "folder" and s.get("root") else ""
            )
            raise FileNotFoundError(
                f"no trained DSI models for {run_name(db)} under {path} (looked for zero_shot.pt and "
                f"fine_tuned.pt); notebooks 03_indexing and 04_retrieval write them: run "
                f"`vitdsi study --profile {profile}{options}` (or `make study`) first"
            )
        expected = codec if codec is not None else codec_for(db)
        models: dict[str, Searcher] = {}
        bovw = BoVW(bovw_words, random_state=int(db.settings["seed"]), progress=False)
        models["BoVW"] = BoVWSearcher(bovw.fit(db.split("index")[0]))
        for name, file in found.items():
            # a model of another database (ID scheme, seed, N, image size) would mark relevance wrongly
            model, codec, _ = load_model(
                file,
                map_location=resolve_device(device),
                expect_config={"image_size": int(db.settings["size"])},
                expect_codec=expected,
                expect_data=db.fingerprint(),
            )
            models[name] = DSISearcher(model, codec)
        return cls(db, models, **kwargs)
