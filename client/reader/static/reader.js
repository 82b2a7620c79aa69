// ichfed reader page. Plain JavaScript, no build step and no network access beyond this server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const STEPS = ["upload", "reading", "segmentation", "classification", "done"];
  const POLL_MS = 400;

  const state = {
    info: null,
    token: null,
    view: null,
    result: null,
    z: 0,
    window: "brain",
    showIch: true,
    showPhe: true,
    opacity: 0.8,
    images: new Map(), // url -> HTMLImageElement (loaded or loading)
    busy: false,
    startedAt: 0,
    timer: null,
  };

  // ---------------------------------------------------------------- formatting
  // Shown precision: volumes 1 decimal (ml), densities whole HU, probabilities 3 decimals.
  const fmtMl = (v) => (v === null || v === undefined ? "—" : `${v.toFixed(1)} ml`);
  const fmtHu = (v) => (v === null || v === undefined ? "—" : `${v.toFixed(0)} HU`);
  const fmtP = (v) => (v === null || v === undefined ? "—" : v.toFixed(3));

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  // ---------------------------------------------------------------- model info
  async function loadInfo() {
    try {
      const r = await fetch("/api/info");
      state.info = await r.json();
      const b = state.info.bundle;
      $("model-info").innerHTML =
        `model <b>${escapeHtml(b.name)}</b> v${escapeHtml(b.version)} · ` +
        `threshold ${fmtP(state.info.threshold)} (${escapeHtml(state.info.threshold_source)})` +
        (state.info.norm_stats_source === "site" ? " · site normalisation statistics" : "") +
        (state.info.calibration_source === "site" ? " · site calibration" : "");
      $("upload-limit").textContent = `Upload limit ${(state.info.max_upload_bytes / 2 ** 20).toFixed(0)} MB · processed in a temporary folder, nothing is kept`;
    } catch (e) {
      $("model-info").textContent = "model information unavailable";
    }
  }

  // ---------------------------------------------------------------- input
  function setupDrop() {
    const dz = $("dropzone");
    // The whole window accepts drops, so a new case can be dropped onto the viewer.
    window.addEventListener("dragover", (e) => { e.preventDefault(); dz.classList.add("over"); });
    window.addEventListener("dragleave", (e) => { if (!e.relatedTarget) dz.classList.remove("over"); });
    window.addEventListener("drop", async (e) => {
      e.preventDefault();
      dz.classList.remove("over");
      const files = await filesFromDrop(e.dataTransfer);
      startCase(files);
    });
    $("file-input").addEventListener("change", (e) => {
      startCase([...e.target.files].map((f) => ({ file: f, path: f.name })));
      e.target.value = "";
    });
    $("folder-input").addEventListener("change", (e) => {
      startCase([...e.target.files].map((f) => ({ file: f, path: f.webkitRelativePath || f.name })));
      e.target.value = "";
    });
    dz.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file-input").click(); }
    });
  }

  // A dropped folder arrives as a directory entry; walk it to collect its files.
  async function filesFromDrop(dt) {
    const entries = [...(dt.items || [])]
      .filter((it) => it.kind === "file")
      .map((it) => (it.webkitGetAsEntry ? it.webkitGetAsEntry() : null));
    if (!entries.length || entries.some((en) => !en)) {
      return [...dt.files].map((f) => ({ file: f, path: f.name }));
    }
    const out = [];
    async function walk(entry, prefix) {
      if (entry.isFile) {
        const file = await new Promise((res, rej) => entry.file(res, rej));
        out.push({ file, path: prefix + file.name });
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        for (;;) {
          const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
          if (!batch.length) break;
          for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
        }
      }
    }
    for (const en of entries) await walk(en, "");
    return out;
  }

  // ---------------------------------------------------------------- case lifecycle
  function startCase(items) {
    items = items.filter((it) => !it.path.split("/").pop().startsWith("."));
    if (!items.length) return;
    if (state.busy) {
      showMessage("A case is still running", "Wait for it to finish, then drop the next one.");
      return;
    }
    const total = items.reduce((s, it) => s + it.file.size, 0);
    if (state.info && total > state.info.max_upload_bytes) {
      showMessage(
        "This upload is too large",
        `${(total / 2 ** 20).toFixed(1)} MB is over the reader's limit of ${(state.info.max_upload_bytes / 2 ** 20).toFixed(0)} MB.`
      );
      return;
    }
    // Clear first: that stops the old case's slice downloads before the server forgets it.
    clearCase();
    forgetCurrent();
    hideMessage();
    state.busy = true;
    const name = items.length === 1 ? items[0].path : `${items[0].path.split("/")[0]} (${items.length} files)`;
    showProgress(name);
    setStep("upload", "Uploading…");

    const form = new FormData();
    for (const it of items) form.append("file", it.file, it.path);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/cases");
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      const pct = Math.round((100 * e.loaded) / e.total);
      $("progress-fill").classList.remove("indeterminate");
      $("progress-fill").style.width = `${pct}%`;
      $("progress-text").textContent = `Uploading… ${pct}% of ${(e.total / 2 ** 20).toFixed(1)} MB`;
    };
    xhr.onload = () => {
      const body = xhr.response || {};
      if (xhr.status === 202 && body.token) {
        state.token = body.token;
        poll();
      } else if (xhr.status === 429) {
        state.busy = false;
        stopElapsed();
        $("progress").hidden = true;
        const wait = xhr.getResponseHeader("Retry-After");
        showMessage("The reader is busy", `${body.error || "too many cases"}. Try again${wait ? ` in about ${wait} s` : " shortly"}.`);
        document.body.dataset.caseState = "busy";
      } else {
        failCase(body.error || `upload failed (HTTP ${xhr.status})`);
      }
    };
    xhr.onerror = () => failCase("the upload was interrupted; check the file and try again");
    xhr.send(form);
  }

  async function poll() {
    if (!state.token) return;
    let body;
    try {
      const r = await fetch(`/api/cases/${state.token}`);
      body = await r.json();
      if (!r.ok) { failCase(body.error || `HTTP ${r.status}`); return; }
    } catch (e) {
      setTimeout(poll, POLL_MS * 2);
      return;
    }
    if (body.state === "done") {
      finishCase(body);
    } else if (body.state === "error") {
      failCase(body.message || "the case could not be read");
    } else {
      const labels = {
        queued: body.queue_position > 0 ? `Waiting: ${body.queue_position} case(s) ahead in the queue` : "Waiting in the queue",
        reading: "Reading the image…",
        segmentation: "Segmenting hemorrhage and edema (nnU-Net)…",
        classification: "Classifying (ResNet-34)…",
        rendering: "Preparing slices…",
      };
      const step = body.state === "queued" ? "reading" : body.state === "rendering" ? "classification" : body.state;
      setStep(step, labels[body.state] || body.state);
      setTimeout(poll, POLL_MS);
    }
  }

  function finishCase(body) {
    state.busy = false;
    stopElapsed();
    setStep("done", "Done");
    $("progress").hidden = true;
    $("dropzone").classList.add("compact");
    state.result = body.result;
    state.view = body.view;
    state.images.clear();
    showResult(body.result);
    openViewer(body.view);
    document.body.dataset.caseState = "done";
  }

  function failCase(message) {
    state.busy = false;
    stopElapsed();
    $("progress").hidden = true;
    if (state.token) forgetCurrent();
    showMessage(
      "This case could not be read",
      `${String(message).replace(/\.$/, "")}. Accepted: a non-contrast head CT as NIfTI (.nii, .nii.gz), a .zip of one DICOM series, or a DICOM folder.`
    );
    document.body.dataset.caseState = "error";
  }

  // Never show one patient's images or numbers while another case is loading.
  function clearCase() {
    state.view = null;
    state.result = null;
    for (const img of state.images.values()) {
      img.onload = null;
      img.removeAttribute("src"); // aborts a download still in flight
    }
    state.images.clear();
    $("viewer").hidden = true;
    $("panel-result").hidden = true;
    $("panel-empty").hidden = false;
    $("dropzone").classList.remove("compact");
    $("probe-label").textContent = "";
    delete $("slice-canvas").dataset.drawnSlice;
  }

  function forgetCurrent() {
    // Drop the previous case on the server now instead of waiting for it to expire.
    if (state.token) {
      fetch(`/api/cases/${state.token}`, { method: "DELETE", keepalive: true }).catch(() => {});
    }
    state.token = null;
  }

  // ---------------------------------------------------------------- progress & messages
  function showProgress(name) {
    $("progress").hidden = false;
    $("progress-name").textContent = name;
    $("progress-fill").style.width = "0";
    document.body.dataset.caseState = "running";
    state.startedAt = performance.now();
    stopElapsed();
    state.timer = setInterval(() => {
      $("progress-elapsed").textContent = `${((performance.now() - state.startedAt) / 1000).toFixed(0)} s`;
    }, 500);
  }

  function stopElapsed() {
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
  }

  function setStep(step, text) {
    const idx = STEPS.indexOf(step);
    for (const li of $("steps").children) {
      const i = STEPS.indexOf(li.dataset.step);
      li.classList.toggle("done", i < idx || step === "done");
      li.classList.toggle("current", i === idx && step !== "done");
    }
    if (step !== "upload") $("progress-fill").classList.add("indeterminate");
    $("progress-text").textContent = text;
  }

  function showMessage(title, text) {
    $("message").innerHTML = `<b>${escapeHtml(title)}</b>${escapeHtml(text)}`;
    $("message").hidden = false;
  }

  function hideMessage() {
    $("message").hidden = true;
  }

  // ---------------------------------------------------------------- side panel
  // The bar puts the threshold in the middle; each half stretches linearly to 0 and to 1, so
  // how far the marker sits from the middle line is how far the case is from the decision.
  function barPosition(p, t) {
    if (p < t) return t > 0 ? (0.5 * p) / t : 0;
    return t < 1 ? 0.5 + (0.5 * (p - t)) / (1 - t) : 1;
  }

  // Failed plausibility checks (shared/quality.py) listed by name with their meaning; a result
  // without the key (an older predictor) counts as unflagged.
  function showFlags(r) {
    const flags = Array.isArray(r.quality_flags) ? r.quality_flags : [];
    const text = (state.info && state.info.quality_flags) || {};
    $("quality").hidden = flags.length === 0;
    $("quality-list").innerHTML = flags
      .map((f) => `<li><code>${escapeHtml(f)}</code> ${escapeHtml(text[f] || "")}</li>`)
      .join("");
    return flags.length > 0;
  }

  function showResult(r) {
    $("panel-empty").hidden = true;
    $("panel-result").hidden = false;
    $("case-name").textContent = r.source;
    const verdict = $("verdict");
    const pred = $("prediction");
    const flagged = showFlags(r);
    pred.classList.toggle("flagged", flagged);
    if (flagged) {
      // A segmentation that fails a plausibility check makes every number after it suspect:
      // no label and no green/red verdict, only the request to look.
      verdict.className = "verdict flagged";
      const what = r.lesion_found
        ? "The model's label is withheld because the segmentation failed the checks above"
        : "The segmentation found no ICH, but it failed the checks above";
      verdict.innerHTML = `Not reliable — review<small>${what}; read the images yourself.</small>`;
      pred.classList.toggle("disabled", !r.lesion_found);
      $("p-value").textContent = r.lesion_found ? `${fmtP(r.p_neoplastic)}  (not reliable)` : "—";
      if (r.lesion_found) $("pbar-marker").style.left = `${(100 * barPosition(r.p_neoplastic, r.threshold)).toFixed(2)}%`;
    } else if (!r.lesion_found) {
      verdict.className = "verdict none";
      verdict.innerHTML = "No hemorrhage found<small>The segmentation found no intracerebral hemorrhage, so the case was not classified.</small>";
      pred.classList.add("disabled");
      $("p-value").textContent = "—";
    } else {
      const neo = r.label === "neoplastic";
      verdict.className = `verdict ${neo ? "neoplastic" : "non-neoplastic"}`;
      verdict.innerHTML = `${neo ? "Neoplastic" : "Non-neoplastic"} ICH<small>model prediction; confirm with follow-up imaging</small>`;
      pred.classList.remove("disabled");
      const pos = barPosition(r.p_neoplastic, r.threshold);
      $("pbar-marker").style.left = `${(100 * pos).toFixed(2)}%`;
      $("p-value").textContent = `${fmtP(r.p_neoplastic)}  (log ${r.log_p_neoplastic.toFixed(2)})`;
    }
    // The calibrated probability is what validation (or the site's out-of-fold scores) supports as a
    // frequency; the threshold still applies to the raw p it was chosen on. Never shown as a number
    // to act on for a flagged case.
    const calibrated = r.lesion_found && r.p_calibrated !== null && r.p_calibrated !== undefined;
    $("p-calibrated").textContent = !calibrated ? "—"
      : `${fmtP(r.p_calibrated)}  (${flagged ? "not reliable" : (state.info && state.info.calibration_source === "site" ? "site" : "validation")})`;
    $("threshold-value").textContent = `${fmtP(r.threshold)}  (${r.threshold_source || "bundle"})`;
    $("pbar-threshold-label").textContent = `threshold ${fmtP(r.threshold)}`;
    $("ich-ml").textContent = fmtMl(r.ich_ml);
    $("ich-hu").textContent = fmtHu(r.ich_mean_hu);
    $("phe-ml").textContent = fmtMl(r.phe_ml);
    $("phe-hu").textContent = fmtHu(r.phe_mean_hu);
    $("n-lesions").textContent = String(r.n_components);
    $("extracranial-ml").textContent = fmtMl(r.extracranial_ml_removed);
    $("model-line").textContent = `model ${r.bundle.name} v${r.bundle.version} (${r.bundle.model || "resnet34"}) · ${String(r.bundle.hash).slice(0, 12)}`;
    $("timings").textContent = Object.entries(r.timings || {})
      .map(([k, v]) => `${k} ${v.toFixed(1)} s`)
      .join(" · ");
    $("result-json").textContent = JSON.stringify(r, null, 2);
  }

  // ---------------------------------------------------------------- viewer
  function openViewer(view) {
    $("viewer").hidden = false;
    const canvas = $("slice-canvas");
    canvas.dataset.bestSlice = String(view.best_slice);
    canvas.width = view.width;
    canvas.height = view.height;
    $("stage").style.setProperty("--aspect", String(view.aspect));
    const slider = $("slice-slider");
    slider.max = String(view.n_slices - 1);
    const ticks = $("slice-ticks");
    ticks.innerHTML = "";
    const frac = (z) => (view.n_slices > 1 ? (100 * z) / (view.n_slices - 1) : 50);
    // Marks under the slider show which slices hold ICH (tall, green) or PHE (short, red).
    // Styles are set through the DOM: the page's CSP forbids inline style attributes.
    const mark = (z, cls) => {
      const i = document.createElement("i");
      if (cls) i.className = cls;
      i.style.left = `${frac(z)}%`;
      ticks.appendChild(i);
    };
    for (const z of view.slices_with.phe) mark(z, "phe");
    for (const z of view.slices_with.ich) mark(z, "");
    setWindow(state.window);
    goTo(view.best_slice);
    preload();
  }

  function sliceUrl(z) {
    return `/api/cases/${state.token}/slices/${z}.png?window=${state.window}`;
  }

  function overlayUrl(label, z) {
    return `/api/cases/${state.token}/overlays/${label}/${z}.png`;
  }

  function image(url) {
    let img = state.images.get(url);
    if (!img) {
      img = new Image();
      img.decoding = "async";
      img.onload = () => { if (img.dataset.z === String(state.z)) draw(); };
      img.src = url;
      state.images.set(url, img);
    }
    return img;
  }

  function draw() {
    if (!state.view || !state.token) return;
    const z = state.z;
    const canvas = $("slice-canvas");
    const ctx = canvas.getContext("2d");
    const layers = [sliceUrl(z)];
    if (state.showPhe && state.view.slices_with.phe.includes(z)) layers.push(overlayUrl("phe", z));
    if (state.showIch && state.view.slices_with.ich.includes(z)) layers.push(overlayUrl("ich", z));
    const imgs = layers.map((u) => { const im = image(u); im.dataset.z = String(z); return im; });
    if (!imgs.every((im) => im.complete && im.naturalWidth)) return; // redrawn from onload
    ctx.globalAlpha = 1;
    ctx.drawImage(imgs[0], 0, 0);
    ctx.globalAlpha = state.opacity;
    for (const im of imgs.slice(1)) ctx.drawImage(im, 0, 0);
    ctx.globalAlpha = 1;
    canvas.dataset.drawnSlice = String(z);
    canvas.dataset.drawnWindow = state.window;
  }

  function goTo(z) {
    if (!state.view) return;
    z = Math.max(0, Math.min(state.view.n_slices - 1, z));
    state.z = z;
    $("slice-slider").value = String(z);
    const sz = state.view.spacing_mm[2];
    $("slice-label").textContent = `Slice ${z + 1} / ${state.view.n_slices} · ${sz.toFixed(1)} mm`;
    draw();
  }

  function setWindow(name) {
    state.window = name;
    for (const b of document.querySelectorAll("button.win")) b.classList.toggle("active", b.dataset.window === name);
    const w = (state.info && state.info.windows && state.info.windows[name]) || state.view.windows[name];
    $("window-label").textContent = `${name} ${w[0]}–${w[1]} HU`;
    draw();
    preload();
  }

  // Fetch the rest of the series in the background, nearest slices first, so scrolling is instant.
  function preload() {
    if (!state.view) return;
    const token = state.token;
    const order = [...Array(state.view.n_slices).keys()].sort((a, b) => Math.abs(a - state.z) - Math.abs(b - state.z));
    let i = 0;
    const next = () => {
      if (token !== state.token || i >= order.length) return;
      const z = order[i++];
      const urls = [sliceUrl(z)];
      if (state.view.slices_with.ich.includes(z)) urls.push(overlayUrl("ich", z));
      if (state.view.slices_with.phe.includes(z)) urls.push(overlayUrl("phe", z));
      Promise.all(urls.map((u) => image(u).decode().catch(() => {}))).then(next);
    };
    for (let k = 0; k < 3; k++) next();
  }

  function setupViewer() {
    $("slice-slider").addEventListener("input", (e) => goTo(Number(e.target.value)));
    $("prev-slice").addEventListener("click", () => goTo(state.z - 1));
    $("next-slice").addEventListener("click", () => goTo(state.z + 1));
    $("best-slice").addEventListener("click", () => state.view && goTo(state.view.best_slice));
    $("stage").addEventListener("wheel", (e) => {
      e.preventDefault();
      goTo(state.z + (e.deltaY > 0 ? -1 : 1));
    }, { passive: false });
    for (const b of document.querySelectorAll("button.win")) b.addEventListener("click", () => setWindow(b.dataset.window));
    $("show-ich").addEventListener("change", (e) => { state.showIch = e.target.checked; draw(); });
    $("show-phe").addEventListener("change", (e) => { state.showPhe = e.target.checked; draw(); });
    $("opacity").addEventListener("input", (e) => { state.opacity = Number(e.target.value) / 100; draw(); });
    // Density read-out under the mouse, at most one request in flight.
    let probing = false;
    let pending = null;
    const probe = async () => {
      if (probing || !pending || !state.view) return;
      const { z, x, y } = pending;
      pending = null;
      probing = true;
      try {
        const r = await fetch(`/api/cases/${state.token}/voxels/${z}/${y}/${x}`);
        if (r.ok) {
          const v = await r.json();
          const where = v.label ? ` · ${v.label.toUpperCase()}` : "";
          $("probe-label").textContent = `${v.hu} HU${where}`;
        }
      } finally {
        probing = false;
        if (pending) probe();
      }
    };
    $("slice-canvas").addEventListener("mousemove", (e) => {
      if (!state.view) return;
      const rect = e.target.getBoundingClientRect();
      const x = Math.floor(((e.clientX - rect.left) / rect.width) * state.view.width);
      const y = Math.floor(((e.clientY - rect.top) / rect.height) * state.view.height);
      if (x < 0 || y < 0 || x >= state.view.width || y >= state.view.height) return;
      pending = { z: state.z, x, y };
      probe();
    });
    $("slice-canvas").addEventListener("mouseleave", () => { pending = null; $("probe-label").textContent = ""; });
    document.addEventListener("keydown", (e) => {
      if (!state.view || e.target.tagName === "INPUT") return;
      if (e.key === "ArrowUp" || e.key === "PageUp") { goTo(state.z + 1); e.preventDefault(); }
      if (e.key === "ArrowDown" || e.key === "PageDown") { goTo(state.z - 1); e.preventDefault(); }
    });
    window.addEventListener("pagehide", forgetCurrent);
  }

  setupDrop();
  setupViewer();
  loadInfo();
})();
