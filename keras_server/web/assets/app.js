// The upload page: pick or drop an image, preview it, POST it to `predict`
// (relative, so a proxy may mount the service under any sub-path), and show
// the top-5 classes as bars, or the API's error, readably. When the server
// serves several models (GET `models`), a menu picks one: its image goes to
// `models/<name>/predict`. A large photo is shrunk here first (see `shrink`):
// the server then decodes a small JPEG instead of megabytes of pixels.
// Under an answer, "Explain" sends the same upload to `explain` and draws
// the heat map it answers over the photo (see `showExplanation`).
"use strict";
/* global apiKey */

(() => {
  const form = document.getElementById("upload");
  const input = document.getElementById("image");
  const dropzone = document.getElementById("dropzone");
  const figure = document.getElementById("preview-figure");
  const preview = document.getElementById("preview");
  const previewName = document.getElementById("preview-name");
  const status = document.getElementById("status");
  const error = document.getElementById("error");
  const list = document.getElementById("predictions");
  const choice = document.getElementById("model-choice");
  const menu = document.getElementById("model");
  const explainPanel = document.getElementById("explain-panel");
  const explainButton = document.getElementById("explain");
  const explanationBox = document.getElementById("explanation");
  const opacity = document.getElementById("explain-opacity");
  const legend = document.getElementById("explain-legend");
  const heatmap = document.getElementById("heatmap");
  // The heat map's colours, low to high: serving/explain.py's RAMP.
  const RAMP = [
    [48, 18, 59],
    [70, 134, 251],
    [27, 229, 181],
    [250, 186, 57],
    [122, 4, 3],
  ];

  // A later pick supersedes a request still in flight: its answer is dropped.
  let ticket = 0;
  let previewUrl = null;
  let listing = null; // GET models' answer, once it has succeeded
  let answered = null; // the upload last classified: { upload, name, url }, for Explain

  // GET models, asked until it answers (it needs the API key, if any).
  async function listModels() {
    if (listing) return listing;
    try {
      const response = await fetch("models", { headers: apiKey.headers() });
      const answer = response.ok ? await response.json() : null;
      if (answer && Array.isArray(answer.models)) listing = answer;
    } catch {
      return null;
    }
    return listing;
  }

  // The chosen model's [width, height] (the default's without a menu); null
  // if unknown, and then nothing is shrunk.
  async function modelInputSize() {
    const answer = await listModels();
    if (!answer) return null;
    const name = choice.hidden || !menu.value ? answer.default : menu.value;
    const model = answer.models.find((m) => m.name === name);
    return model && Array.isArray(model.input_size) ? model.input_size : null;
  }

  // A photo much larger than the model's input goes as a JPEG whose sides
  // stay at least twice the input's (the server's resize still has pixels to
  // smooth over), drawn upright (the browser applies EXIF rotation) on white
  // (as the server shows transparency). Anything else goes as it is.
  async function shrink(file) {
    if (!file.type.startsWith("image/")) return file;
    const size = await modelInputSize();
    if (!size) return file;
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch {
      return file; // the browser cannot draw it: let the server say why
    }
    const scale = Math.max((2 * size[0]) / bitmap.width, (2 * size[1]) / bitmap.height);
    if (scale >= 1) {
      bitmap.close();
      return file;
    }
    const width = Math.max(2 * size[0], Math.round(bitmap.width * scale));
    const height = Math.max(2 * size[1], Math.round(bitmap.height * scale));
    bitmap.close();
    const small = await createImageBitmap(file, {
      resizeWidth: width,
      resizeHeight: height,
      resizeQuality: "high",
    });
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff";
    context.fillRect(0, 0, width, height);
    context.drawImage(small, 0, 0);
    small.close();
    const blob = await new Promise((done) => canvas.toBlob(done, "image/jpeg", 0.9));
    return blob ? new File([blob], file.name, { type: "image/jpeg" }) : file;
  }

  function showPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    preview.removeAttribute("src");
    // Only image types get a preview; anything else is still sent, so that
    // the API's own answer says what is wrong with it.
    figure.hidden = !file.type.startsWith("image/");
    if (figure.hidden) return;
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.alt = `Preview of ${file.name}`;
    previewName.textContent = file.name;
  }

  function clearAnswer() {
    answered = null;
    explainPanel.hidden = true;
    explanationBox.hidden = true;
    heatmap.hidden = true;
    document.getElementById("job-results").replaceChildren();
    error.replaceChildren();
    list.replaceChildren();
  }

  function showError(title, detail) {
    status.textContent = "";
    const heading = document.createElement("p");
    const strong = document.createElement("strong");
    strong.textContent = title;
    heading.append(strong);
    const message = document.createElement("p");
    message.className = "error-message";
    message.textContent = detail;
    error.replaceChildren(heading, message);
  }

  function percent(probability) {
    if (probability > 0 && probability < 0.001) return "<0.1%";
    return `${(probability * 100).toFixed(1)}%`;
  }

  function showPredictions(predictions) {
    status.textContent = "";
    const items = predictions.map((prediction) => {
      const item = document.createElement("li");
      item.className = "prediction";
      item.dataset.label = prediction.label;

      const label = document.createElement("span");
      label.className = "prediction-label";
      // Keras class names use underscores ("tiger_cat").
      label.textContent = prediction.label.replaceAll("_", " ");

      const value = document.createElement("span");
      value.className = "prediction-percent";
      value.textContent = percent(prediction.probability);

      // The bar repeats the number beside it, so screen readers skip it.
      const bar = document.createElement("span");
      bar.className = "prediction-bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "prediction-fill";
      fill.style.width = `${Math.min(100, Math.max(0, prediction.probability * 100))}%`;
      bar.append(fill);

      item.append(label, value, bar);
      return item;
    });
    list.replaceChildren(...items);
  }

  // The menu appears only when there is a choice; without it (one model, or
  // GET models failing, e.g. 401 before an API key is given) images go to the
  // default model, as before.
  async function offerModels() {
    const listed = await listModels();
    const models = listed ? listed.models : [];
    if (models.length < 2) return;
    const options = models.map((model) => {
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = model.name === listed.default ? `${model.name} (default)` : model.name;
      option.selected = model.name === listed.default;
      return option;
    });
    menu.replaceChildren(...options);
    choice.hidden = false;
  }

  function predictUrl(route = "predict") {
    if (choice.hidden || !menu.value) return new URL(route, document.baseURI).href;
    // Relative to the page, like every other URL here.
    return new URL(`models/${encodeURIComponent(menu.value)}/${route}`, document.baseURI).href;
  }

  // The colour of an importance (0..1) on RAMP.
  function colour(value) {
    const position = Math.min(1, Math.max(0, value)) * (RAMP.length - 1);
    const low = Math.min(Math.floor(position), RAMP.length - 2);
    const share = position - low;
    return RAMP[low].map((c, i) => Math.round(c * (1 - share) + RAMP[low + 1][i] * share));
  }

  // The grid drawn one pixel per cell; the canvas is stretched over the
  // photo (CSS), and the browser smooths it as it scales.
  function showExplanation(explanation, name) {
    const { rows, columns } = explanation;
    heatmap.width = columns;
    heatmap.height = rows;
    const context = heatmap.getContext("2d");
    const image = context.createImageData(columns, rows);
    explanation.heatmap.forEach((row, r) =>
      row.forEach((value, c) => {
        const [red, green, blue] = colour(value);
        image.data.set([red, green, blue, 255], (r * columns + c) * 4);
      }),
    );
    context.putImageData(image, 0, 0);
    heatmap.style.opacity = String(opacity.value / 100);
    heatmap.hidden = false;
    const label = explanation.class.label.replaceAll("_", " ");
    const sure = percent(explanation.probability);
    if (explanation.method === "gradcam") {
      legend.textContent =
        `Grad-CAM for “${label}” (${sure}): how strongly each part of ${name} ` +
        `(${rows} × ${columns}, the grid of the model's last convolutional layer) ` +
        "drives that answer. Red: the most; dark blue: not at all.";
    } else if (!explanation.max_drop) {
      legend.textContent =
        `Hiding any one of ${rows} × ${columns} parts of ${name} did not lower the ` +
        `model's confidence in “${label}” (${sure}): no part stands out.`;
    } else {
      const drop = (explanation.max_drop * 100).toFixed(1);
      legend.textContent =
        `Where the model looked for “${label}” (${sure}): it was shown ${name} again ` +
        `${explanation.images - 1} times, with one of ${rows} × ${columns} parts hidden ` +
        `each time. Red parts lowered its confidence the most (by up to ${drop} points); ` +
        "dark blue ones not at all.";
    }
    explanationBox.hidden = false;
  }

  async function explain() {
    const mine = ticket; // an answer to another image drops this one
    const asked = answered;
    if (!asked) return;
    explainButton.disabled = true;
    form.setAttribute("aria-busy", "true");
    status.textContent = `Explaining ${asked.name}: the model looks at it again, part by part…`;
    const body = new FormData();
    body.append("image", asked.upload, asked.name);
    let response = null;
    let answer = null;
    try {
      response = await fetch(asked.url, { method: "POST", body, headers: apiKey.headers() });
      answer = await response.json();
    } catch {
      answer = null;
    }
    if (mine !== ticket) return;
    explainButton.disabled = false;
    form.removeAttribute("aria-busy");
    if (answer && answer.success === true && answer.explanation) {
      status.textContent = "";
      showExplanation(answer.explanation, asked.name);
    } else if (answer && typeof answer.error === "string") {
      showError(`Could not explain ${asked.name} (HTTP ${response.status}).`, answer.error);
    } else {
      const reason = response ? `${response.status} ${response.statusText}`.trim() : "no answer";
      showError(`Could not explain ${asked.name}.`, `The server answered ${reason}.`);
    }
  }

  explainButton.addEventListener("click", explain);
  opacity.addEventListener("input", () => {
    heatmap.style.opacity = String(opacity.value / 100);
  });

  async function classify(file) {
    const mine = ++ticket;
    clearAnswer();
    showPreview(file);
    status.textContent = `Classifying ${file.name}…`;
    form.setAttribute("aria-busy", "true");

    const upload = await shrink(file).catch(() => file);
    if (mine !== ticket) return;
    const body = new FormData();
    body.append("image", upload, file.name);
    let response;
    try {
      // "predict" (or models/<name>/predict) resolved against the page's URL.
      response = await fetch(predictUrl(), { method: "POST", body, headers: apiKey.headers() });
    } catch (failure) {
      if (mine !== ticket) return;
      form.removeAttribute("aria-busy");
      showError(
        "Could not reach the server.",
        `Check that it is running and try again (${failure.message}).`,
      );
      return;
    }

    // A proxy in front may answer with its own HTML page (502, 413...).
    let answer = null;
    try {
      answer = await response.json();
    } catch {
      answer = null;
    }
    if (mine !== ticket) return;
    form.removeAttribute("aria-busy");

    if (answer && answer.success === true && Array.isArray(answer.predictions)) {
      showPredictions(answer.predictions);
      answered = { upload, name: file.name, url: predictUrl("explain") };
      explainPanel.hidden = false;
    } else if (response.status === 401 && answer && typeof answer.error === "string") {
      // --api-keys: ask for a key, then send this file again with it.
      showError(`Could not classify ${file.name} (HTTP 401).`, answer.error);
      // With a key, GET models may answer now: offer the menu, then retry.
      apiKey.ask(() => {
        if (choice.hidden) offerModels();
        classify(file);
      });
    } else if (answer && typeof answer.error === "string") {
      showError(`Could not classify ${file.name} (HTTP ${response.status}).`, answer.error);
    } else {
      const reason = `${response.status} ${response.statusText}`.trim();
      showError(`Could not classify ${file.name}.`, `The server answered ${reason}.`);
    }
  }

  // Several files: one asynchronous job (POST jobs), its progress polled
  // from its status URL, each image's top class listed as it comes.
  const jobList = document.getElementById("job-results");

  function showJob(job) {
    const done = job.done;
    status.textContent =
      job.state === "done"
        ? `Done: ${job.succeeded} of ${job.total} classified, ${job.failed} failed.`
        : job.state === "cancelled"
          ? `Cancelled after ${done} of ${job.total}.`
          : `Classifying ${job.total} images: ${done} done…`;
    jobList.replaceChildren(
      ...job.results.map((item) => {
        const row = document.createElement("li");
        row.className = "job-item";
        const name = document.createElement("span");
        name.className = "job-name";
        name.textContent = item.filename;
        const answer = document.createElement("span");
        answer.className = "job-answer";
        if (item.success === true) {
          const top = item.predictions[0];
          answer.textContent = `${top.label.replaceAll("_", " ")} ${percent(top.probability)}`;
        } else if (item.success === false) {
          answer.textContent = item.error;
          row.classList.add("failed");
        } else {
          answer.textContent = "…";
        }
        row.append(name, answer);
        return row;
      }),
    );
  }

  async function submitJob(files) {
    const mine = ++ticket;
    clearAnswer();
    figure.hidden = true;
    status.textContent = `Sending ${files.length} images…`;
    form.setAttribute("aria-busy", "true");
    const body = new FormData();
    if (!choice.hidden && menu.value) body.append("model", menu.value);
    for (const file of files) {
      body.append("image", await shrink(file).catch(() => file), file.name);
    }
    if (mine !== ticket) return;
    let answer = null;
    let response = null;
    try {
      response = await fetch("jobs", { method: "POST", body, headers: apiKey.headers() });
      answer = await response.json();
    } catch (failure) {
      answer = null;
    }
    if (mine !== ticket) return;
    if (!response || response.status !== 202 || !answer) {
      form.removeAttribute("aria-busy");
      const detail = answer && answer.error ? answer.error : "The server could not be reached.";
      if (response && response.status === 401) apiKey.ask(() => submitJob(files));
      showError(`Could not send ${files.length} images.`, detail);
      return;
    }
    // The status URL is relative to the server's root; ask it relative to the page.
    const url = `jobs/${encodeURIComponent(answer.id)}?limit=1000`;
    while (mine === ticket) {
      let job = null;
      try {
        const polled = await fetch(url, { headers: apiKey.headers() });
        job = polled.ok ? await polled.json() : null;
      } catch {
        job = null;
      }
      if (mine !== ticket) return;
      if (job) {
        showJob(job);
        if (job.state === "done" || job.state === "cancelled") break;
      }
      await new Promise((wake) => setTimeout(wake, 500));
    }
    form.removeAttribute("aria-busy");
  }

  function take(files) {
    if (!files || files.length === 0) return;
    if (files.length > 1) submitJob(Array.from(files));
    else classify(files[0]);
  }

  // A file the browser cannot draw (corrupt, or a type it lacks) loses its
  // preview, not its answer.
  preview.addEventListener("error", () => {
    if (preview.getAttribute("src")) figure.hidden = true;
  });

  input.addEventListener("change", () => {
    take(input.files);
    // So that choosing the same file again classifies it again.
    input.value = "";
  });

  for (const name of ["dragenter", "dragover"]) {
    dropzone.addEventListener(name, (event) => {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      dropzone.classList.add("dragging");
    });
  }
  dropzone.addEventListener("dragleave", () => dropzone.classList.remove("dragging"));
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("dragging");
    take(event.dataTransfer.files);
  });

  // A file dropped beside the drop zone must not replace the page with itself.
  for (const name of ["dragover", "drop"]) {
    window.addEventListener(name, (event) => event.preventDefault());
  }

  offerModels();

  // The picker is driven by script from here on; the plain form is the
  // no-JavaScript fallback.
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    take(input.files);
  });
})();
