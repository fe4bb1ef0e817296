// The live page: camera in over WHIP, restyled video out over WHEP, state from the session's
// server-sent events. Plain ES module, no build step, nothing loaded from elsewhere.

const TOKEN_KEY = "live-v2v.token";
const PARAMS_DEBOUNCE_MS = 300;
// Host candidates gather in milliseconds; the bound only matters when an interface hangs, and
// then what was gathered so far is sent rather than nothing.
const ICE_GATHERING_MAX_MS = 5000;

const $ = (id) => document.getElementById(id);

const ui = {
  camera: $("camera"),
  pipeline: $("pipeline"),
  pipelineDescription: $("pipeline-description"),
  pipelineUnavailable: $("pipeline-unavailable"),
  token: $("token"),
  tokenDetails: $("token-details"),
  start: $("start"),
  stop: $("stop"),
  setup: $("setup"),
  paramsForm: $("params"),
  paramFields: $("param-fields"),
  paramsNote: $("params-note"),
  state: $("state"),
  stateDetail: $("state-detail"),
  fpsIn: $("fps-in"),
  fpsOut: $("fps-out"),
  latency: $("latency"),
  sessionId: $("session-id"),
  error: $("error"),
  input: $("input"),
  output: $("output"),
};

let pipelines = [];
// Everything that belongs to the running stream; null when idle.
let live = null;

// -- small helpers ----------------------------------------------------------------------------

function authHeaders() {
  const token = ui.token.value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function describeFailure(response) {
  // The service answers {"detail": {"msg": ...}} or, for invalid fields, {"detail": [{loc, msg}]}.
  let text = "";
  try {
    const body = await response.json();
    const detail = body.detail;
    if (Array.isArray(detail)) {
      text = detail.map((d) => `${(d.loc || []).slice(-1)[0] ?? "params"}: ${d.msg}`).join("; ");
    } else if (detail && detail.msg) {
      text = detail.msg;
    }
  } catch {
    text = "";
  }
  if (response.status === 401) {
    ui.tokenDetails.open = true;
    return "The service needs an access token: enter it under Access token.";
  }
  return text || `${response.status} ${response.statusText}`;
}

async function api(method, path, body) {
  const init = { method, headers: { ...authHeaders() } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw new Error(await describeFailure(response));
  return response.json();
}

function lastPathSegment(url) {
  return new URL(url, location.href).pathname.replace(/\/+$/, "").split("/").pop();
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

const STATE_LABELS = {
  idle: "Idle",
  connecting: "Connecting",
  loading: "Loading",
  online: "Live",
  degraded: "Live, degraded",
  error: "Error",
  ended: "Ended",
};

function setState(state, detail) {
  document.body.dataset.state = state;
  // Only real changes go to the live region, so a screen reader hears each state once.
  if (ui.state.textContent !== STATE_LABELS[state]) ui.state.textContent = STATE_LABELS[state];
  if (ui.stateDetail.textContent !== detail) ui.stateDetail.textContent = detail;
}

function setMetrics(status) {
  const fmt = (value, digits) => (value == null ? "–" : Number(value).toFixed(digits));
  ui.fpsIn.textContent = fmt(status?.input_status?.fps, 1);
  ui.fpsOut.textContent = fmt(status?.inference_status?.fps, 1);
  ui.latency.textContent = fmt(status?.latency?.p50_ms, 0);
}

function setRunning(running) {
  ui.start.disabled = running || !ui.pipeline.value;
  ui.stop.disabled = !running;
  ui.pipeline.disabled = running || pipelines.length === 0;
  ui.camera.disabled = running;
}

// -- token --------------------------------------------------------------------------------------

function initToken() {
  ui.token.value = localStorage.getItem(TOKEN_KEY) || "";
  ui.token.addEventListener("change", () => {
    const token = ui.token.value.trim();
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  });
}

// -- cameras ------------------------------------------------------------------------------------

async function listCameras() {
  if (!navigator.mediaDevices?.enumerateDevices) return;
  const chosen = ui.camera.value;
  const devices = await navigator.mediaDevices.enumerateDevices();
  const cameras = devices.filter((d) => d.kind === "videoinput");
  ui.camera.replaceChildren(new Option("Default camera", ""));
  cameras.forEach((camera, i) => {
    // Labels are empty until the camera was allowed once; then they fill in.
    if (camera.deviceId) ui.camera.add(new Option(camera.label || `Camera ${i + 1}`, camera.deviceId));
  });
  if ([...ui.camera.options].some((o) => o.value === chosen)) ui.camera.value = chosen;
}

async function openCamera() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error(
      "This browser gives the camera only to secure pages: open the page at http://localhost " +
        "or over https://.",
    );
  }
  const video = ui.camera.value ? { deviceId: { exact: ui.camera.value } } : true;
  try {
    return await navigator.mediaDevices.getUserMedia({ video, audio: true });
  } catch (error) {
    if (error.name === "NotAllowedError") throw new Error("The camera was not allowed.");
    // No microphone (or it is busy): video alone is enough.
    try {
      return await navigator.mediaDevices.getUserMedia({ video });
    } catch (videoError) {
      throw new Error(`The camera could not be opened: ${videoError.message || videoError.name}`);
    }
  }
}

// -- pipelines and their parameters ------------------------------------------------------------

async function loadPipelines() {
  try {
    const data = await api("GET", "/pipelines");
    pipelines = data.pipelines;
    ui.pipeline.replaceChildren(
      ...pipelines.map((p) => {
        const why = p.requires_gpu ? "needs a GPU" : "unavailable";
        const option = new Option(p.unavailable ? `${p.name} (${why})` : p.name, p.name);
        option.disabled = Boolean(p.unavailable);
        return option;
      }),
    );
    showUnavailable();
    const usable = pipelines.filter((p) => !p.unavailable).map((p) => p.name);
    ui.pipeline.value = usable.includes(data.default) ? data.default : (usable[0] ?? "");
    renderParams();
  } catch (error) {
    ui.pipeline.replaceChildren(new Option("No pipelines", ""));
    showError(`The pipelines could not be listed: ${error.message}`);
  }
  setRunning(false);
}

// Why each pipeline that cannot run here cannot, under the list it is picked from: a disabled
// option cannot be selected, so its reason would otherwise never show. Those that need a GPU
// come first, since no download helps them.
function showUnavailable() {
  const unavailable = pipelines
    .filter((p) => p.unavailable)
    .sort((a, b) => Boolean(b.requires_gpu) - Boolean(a.requires_gpu));
  ui.pipelineUnavailable.replaceChildren(
    ...unavailable.map((p) => {
      const item = document.createElement("li");
      const name = document.createElement("strong");
      name.textContent = p.name;
      item.dataset.pipeline = p.name;
      item.append(name, `${p.requires_gpu ? " needs a GPU" : " is unavailable"}: ${p.unavailable}`);
      return item;
    }),
  );
  ui.pipelineUnavailable.hidden = unavailable.length === 0;
}

function currentPipeline() {
  return pipelines.find((p) => p.name === ui.pipeline.value);
}

// A property's schema with pydantic's `anyOf: [{...}, {"type": "null"}]` (optional fields, or a
// number-or-list) resolved to the first branch a form control can edit; a list of integers
// (t_index_list) is edited as comma-separated numbers. What describes the field (its title,
// description, default, `x-ui`) stays from the property itself.
function editable(schema) {
  const branches = schema.anyOf ?? [schema];
  const branch =
    branches.find((b) => ["number", "integer", "string", "boolean"].includes(b.type) || b.enum) ??
    branches.find((b) => b.type === "array" && b.items?.type === "integer");
  if (!branch) return null;
  const { title, description, default: fallback } = schema;
  return { ...branch, title, description, default: fallback, ui: schema["x-ui"] };
}

// Labels come from the schema (sentence case there); a name without one reads the same way.
function titleOf(name, schema) {
  if (schema.title) return schema.title;
  const words = name.replaceAll("_", " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function renderParams() {
  const pipeline = currentPipeline();
  ui.paramFields.replaceChildren();
  ui.paramsNote.textContent = "";
  ui.pipelineDescription.textContent = pipeline
    ? pipeline.unavailable || pipeline.description
    : "";
  if (!pipeline) return;
  const properties = pipeline.params.properties ?? {};
  // In the order the pipeline declares them (related ones together), the prompt first: it is
  // what people change most.
  const liveNames = new Set(pipeline.live_params);
  const names = [...Object.keys(properties).filter((n) => liveNames.has(n)), ...liveNames]
    .filter((name, i, all) => all.indexOf(name) === i)
    .sort((a, b) => (b === "prompt") - (a === "prompt"));
  const advanced = [];
  for (const name of names) {
    const schema = properties[name] && editable(properties[name]);
    // Hidden: accepted for Livepeer's gateways but not something this pipeline does.
    if (!schema || schema.ui === "hidden") continue;
    const field = paramField(name, schema);
    if (schema.ui === "advanced") advanced.push(field);
    else ui.paramFields.append(field);
  }
  if (advanced.length) {
    const more = document.createElement("details");
    more.className = "disclosure";
    more.id = "advanced-params";
    const summary = document.createElement("summary");
    summary.textContent = `More parameters (${advanced.length})`;
    more.append(summary, ...advanced);
    ui.paramFields.append(more);
  }
  if (!ui.paramFields.children.length) {
    ui.paramsNote.textContent = "This pipeline has no live parameters.";
  }
}

function paramField(name, schema) {
  const id = `param-${name}`;
  const field = document.createElement("div");
  field.className = "field";
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = titleOf(name, schema);
  let control;
  let kind = schema.enum ? "enum" : schema.type;
  if (schema.enum) {
    control = document.createElement("select");
    for (const value of schema.enum) control.add(new Option(String(value), String(value)));
    if (schema.default != null) control.value = String(schema.default);
  } else if (schema.type === "boolean") {
    field.classList.add("inline");
    control = document.createElement("input");
    control.type = "checkbox";
    control.checked = Boolean(schema.default);
  } else if (schema.type === "string") {
    control = document.createElement(name === "prompt" ? "textarea" : "input");
    if (name !== "prompt") control.type = "text";
    control.value = typeof schema.default === "string" ? schema.default : "";
  } else if (schema.type === "array") {
    kind = "integer-list";
    control = document.createElement("input");
    control.type = "text";
    control.inputMode = "numeric";
    control.spellcheck = false;
    control.value = Array.isArray(schema.default) ? schema.default.join(", ") : "";
  } else {
    control = numberControl(schema);
  }
  control.id = id;
  control.name = name;
  control.dataset.kind = kind;
  if (schema.type === "boolean") field.append(control, " ", label);
  else field.append(label);
  if (control.type === "range") {
    const row = document.createElement("div");
    row.className = "range-row";
    const shown = document.createElement("output");
    shown.htmlFor = id;
    shown.value = control.value;
    control.addEventListener("input", () => (shown.value = control.value));
    row.append(control, shown);
    field.append(row);
  } else if (schema.type !== "boolean") {
    field.append(control);
  }
  if (schema.description) {
    const hint = document.createElement("p");
    hint.className = "hint";
    hint.id = `${id}-hint`;
    hint.textContent = schema.description;
    control.setAttribute("aria-describedby", hint.id);
    field.append(hint);
  }
  return field;
}

// Integers with more values than this get a number box: a slider with a hundred stops (or
// 2^64, for a seed) is no way to pick one exact value.
const SLIDER_MAX_STOPS = 20;

function numberControl(schema) {
  const control = document.createElement("input");
  const bounded = schema.minimum != null && schema.maximum != null;
  const stops = bounded ? (schema.maximum - schema.minimum) / (schema.multipleOf ?? 1) : Infinity;
  const slider = bounded && (schema.type !== "integer" || stops <= SLIDER_MAX_STOPS);
  control.type = slider ? "range" : "number";
  if (schema.minimum != null) control.min = schema.minimum;
  if (schema.maximum != null) control.max = schema.maximum;
  if (schema.type === "integer") control.step = schema.multipleOf ?? 1;
  else control.step = slider ? sliderStep(schema) : "any";
  if (typeof schema.default === "number") control.value = schema.default;
  else if (slider) control.value = schema.minimum;
  return control;
}

// About a hundred round steps across the range; "any" when the default is off that grid, since
// a range input snaps its value to the grid and would otherwise change the default.
function sliderStep(schema) {
  const step = 10 ** Math.floor(Math.log10((schema.maximum - schema.minimum) / 100));
  const from = typeof schema.default === "number" ? schema.default : schema.minimum;
  const offset = (from - schema.minimum) / step;
  return Math.abs(offset - Math.round(offset)) < 1e-9 ? step : "any";
}

// "12, 20, 32" -> [12, 20, 32]; anything else goes as typed, and the service's 422 says what
// is wrong with it.
function integerList(text) {
  const parts = text.split(/[\s,]+/).filter(Boolean);
  return parts.length && parts.every((p) => /^-?\d+$/.test(p)) ? parts.map(Number) : text;
}

// The full parameter set: control messages replace the whole set, so every control is sent.
function paramValues() {
  const values = {};
  for (const control of ui.paramFields.querySelectorAll("[name]")) {
    const kind = control.dataset.kind;
    if (kind === "boolean") values[control.name] = control.checked;
    else if (kind === "integer-list") values[control.name] = integerList(control.value);
    else if (kind === "number" || kind === "integer") {
      if (control.value === "") continue;
      values[control.name] = kind === "integer" ? parseInt(control.value, 10) : Number(control.value);
    } else values[control.name] = control.value;
  }
  return values;
}

let paramsTimer = null;

function sessionRunning() {
  return Boolean(live?.session && !live.stopping && !live.ended);
}

const NOT_RUNNING_NOTE = "No session is running: these apply when you start one.";

function paramsChanged() {
  clearTimeout(paramsTimer);
  if (!sessionRunning()) {
    // Before Start, or after Stop: nothing receives them now, and the start sends them all.
    if (ui.paramFields.children.length) ui.paramsNote.textContent = NOT_RUNNING_NOTE;
    return;
  }
  paramsTimer = setTimeout(sendParams, PARAMS_DEBOUNCE_MS);
}

async function sendParams() {
  const current = live;
  if (!sessionRunning()) {
    ui.paramsNote.textContent = NOT_RUNNING_NOTE;
    return;
  }
  const values = paramValues();
  const sent = JSON.stringify(values);
  // A text field fires "input" while typing and "change" when it loses focus: one set, once.
  if (sent === current.paramsSent) return;
  try {
    const path = `/live-video-to-video/${current.session.session_id}/params`;
    const answer = await api("POST", path, values);
    if (live !== current || !sessionRunning()) return; // stopped meanwhile: its note is set
    current.paramsSent = sent;
    ui.paramsNote.textContent = {
      live: "Applied live.",
      reload: "Applied: the pipeline reloads.",
      unchanged: "Already applied.",
    }[answer.outcome] ?? "";
  } catch (error) {
    if (live !== current || !sessionRunning()) return;
    ui.paramsNote.textContent = "";
    showError(`The parameters were not taken: ${error.message}`);
  }
}

// -- WebRTC: WHIP out, WHEP in -------------------------------------------------------------------

// ICE servers from `Link: <stun:...>; rel="ice-server"` headers (RFC 9725 §4.6); none on a
// loopback setup, where host candidates are all there is.
function iceServersFrom(response) {
  const servers = [];
  const header = response.headers.get("Link") || "";
  for (const link of header.split(/,(?=\s*<)/)) {
    const match = link.match(/<([^>]+)>(.*)/);
    if (!match || !/rel="?ice-server"?/.test(match[2])) continue;
    const server = { urls: match[1] };
    const username = match[2].match(/username="([^"]*)"/);
    const credential = match[2].match(/credential="([^"]*)"/);
    if (username) server.username = username[1];
    if (credential) server.credential = credential[1];
    servers.push(server);
  }
  return servers;
}

async function iceServers(url) {
  try {
    return iceServersFrom(await fetch(url, { method: "OPTIONS", headers: authHeaders() }));
  } catch {
    return [];
  }
}

function gatheringComplete(pc) {
  // No trickle ICE: the offer goes out once it holds every candidate.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    }, ICE_GATHERING_MAX_MS);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

// One WHIP or WHEP exchange: POST the offer, get 201 with the answer and the resource to DELETE.
async function negotiate(pc, url) {
  await pc.setLocalDescription(await pc.createOffer());
  await gatheringComplete(pc);
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", ...authHeaders() },
    body: pc.localDescription.sdp,
  });
  if (response.status !== 201) throw new Error(await describeFailure(response));
  const resource = response.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  return resource ? new URL(resource, url).href : null;
}

function watchConnection(pc, what) {
  pc.addEventListener("connectionstatechange", () => {
    if (!live || live.stopping) return;
    if (pc.connectionState === "failed") {
      showError(`The ${what} connection failed (no network path between browser and service).`);
    }
  });
}

async function publish(stream, url) {
  const pc = new RTCPeerConnection({ iceServers: await iceServers(url) });
  watchConnection(pc, "camera");
  for (const track of stream.getTracks()) {
    pc.addTransceiver(track, { direction: "sendonly", streams: [stream] });
  }
  return { pc, resource: await negotiate(pc, url) };
}

async function play(url) {
  const pc = new RTCPeerConnection({ iceServers: await iceServers(url) });
  watchConnection(pc, "output");
  const stream = new MediaStream();
  pc.addEventListener("track", (event) => {
    stream.addTrack(event.track);
    ui.output.srcObject = stream;
  });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  return { pc, resource: await negotiate(pc, url) };
}

// -- session events -----------------------------------------------------------------------------

function openEvents(session) {
  const url = session.events_stream_url || `/events/${lastPathSegment(session.events_url)}`;
  const events = new EventSource(url);
  events.addEventListener("message", (message) => {
    let data;
    try {
      data = JSON.parse(message.data);
    } catch {
      return;
    }
    onEvent(data.event ?? {});
  });
  events.addEventListener("error", () => {
    // The stream ends after the final status; EventSource would then reconnect to a session
    // that is gone. Anything else is a lost connection it retries on its own.
    if (!live || live.ended || events.readyState === EventSource.CLOSED) {
      events.close();
      if (live && !live.ended && !live.stopping) ended("the service stopped answering");
    }
  });
  return events;
}

function onEvent(event) {
  if (!live) return;
  if (event.type === "status") {
    setMetrics(event);
    if (event.end_reason) {
      ended(event.end_reason, event.state === "ERROR" ? event.inference_status?.last_error : null);
      return;
    }
    switch (event.state) {
      case "LOADING":
        setState("loading", `Loading the ${event.pipeline} pipeline…`);
        break;
      case "ONLINE":
        // Ready and fed, but "live" only once restyled frames go out (the session sends a
        // status with the first one).
        if (event.frames_out) setState("online", `${event.pipeline} is live.`);
        else setState("connecting", "Waiting for the first restyled frame…");
        break;
      case "DEGRADED_INPUT":
        setState("degraded", "Waiting for video from the camera…");
        break;
      case "DEGRADED_INFERENCE":
        setState(
          "degraded",
          event.inference_status?.last_error
            ? `The pipeline is struggling: ${event.inference_status.last_error}`
            : "The pipeline is recovering.",
        );
        break;
      case "ERROR":
        setState("error", event.inference_status?.last_error || "The session failed.");
        break;
      default:
        break;
    }
  } else if (event.type === "error") {
    showError(event.message);
  } else if (event.type === "restart") {
    showError("The pipeline failed repeatedly and was restarted.");
  }
}

// -- start and stop -----------------------------------------------------------------------------

async function start() {
  showError("");
  ui.paramsNote.textContent = "";
  const current = { session: null, whip: null, whep: null, events: null, camera: null };
  live = current;
  setRunning(true);
  setMetrics(null);
  try {
    setState("connecting", "Opening the camera…");
    current.camera = await openCamera();
    if (current.stopping) {
      for (const track of current.camera.getTracks()) track.stop();
      return;
    }
    ui.input.srcObject = current.camera;
    listCameras(); // the labels are known now

    setState("connecting", "Starting the session…");
    const params = paramValues();
    current.session = await api("POST", "/live-video-to-video", {
      model_id: ui.pipeline.value,
      params,
    });
    current.paramsSent = JSON.stringify(params);
    if (current.stopping) {
      // Stop came while the session was starting: end it here, nobody else knows of it.
      await api("DELETE", `/live-video-to-video/${current.session.session_id}`).catch(() => {});
      return;
    }
    ui.sessionId.textContent = current.session.session_id;
    document.body.dataset.sessionId = current.session.session_id;
    current.events = openEvents(current.session);
    if (!current.session.whip_url || !current.session.whep_url) {
      throw new Error("This service does not offer WebRTC (no WHIP/WHEP URL in its answer).");
    }
    setState("connecting", "Connecting the camera and the output…");
    const [whip, whep] = await Promise.all([
      publish(current.camera, current.session.whip_url),
      play(current.session.whep_url),
    ]);
    current.whip = whip;
    current.whep = whep;
    // Stopped (or ended) while negotiating: these two came back after the rest was released.
    if (current.stopping) await releasePeers(current);
  } catch (error) {
    if (current.stopping) return;
    showError(error.message);
    // Without a session nothing runs: back to the start. With one, the state stays on screen
    // and Stop ends it.
    if (!current.session) await teardown("error");
  }
}

async function deleteResource(url) {
  if (!url) return;
  try {
    await fetch(url, { method: "DELETE", headers: authHeaders() });
  } catch {
    // Gone already, or the service is: either way nothing is left to end.
  }
}

// Ends the WHIP and WHEP resources and closes both peer connections, once: Stop and the
// session's final status may both get here.
async function releasePeers(current) {
  const peers = [current.whip, current.whep].filter(Boolean);
  current.whip = current.whep = null;
  await Promise.all(peers.map((peer) => deleteResource(peer.resource)));
  for (const peer of peers) peer.pc.close();
}

async function teardown(state, detail) {
  const current = live;
  if (!current) return;
  current.stopping = true;
  clearTimeout(paramsTimer);
  // What the note said was about the session that ends here.
  if (ui.paramsNote.textContent !== NOT_RUNNING_NOTE) ui.paramsNote.textContent = "";
  await releasePeers(current);
  for (const track of current.camera?.getTracks() ?? []) track.stop();
  ui.input.srcObject = null;
  ui.output.srcObject = null;
  // After the final status (or a Stop) the stream has nothing more to say, and an open
  // EventSource would keep reconnecting to a session that is gone.
  current.events?.close();
  live = null;
  delete document.body.dataset.sessionId;
  setRunning(false);
  if (state === "error") setState("error", "Not started.");
  else setState(state, detail);
}

async function stop() {
  if (!live) return;
  live.stopping = true;
  ui.stop.disabled = true;
  setState("connecting", "Stopping…");
  const session = live.session;
  await releasePeers(live);
  if (session) {
    try {
      await api("DELETE", `/live-video-to-video/${session.session_id}`);
    } catch (error) {
      // 404: it had ended on its own already.
      if (!/no live session/.test(error.message)) showError(error.message);
    }
  }
  live?.events?.close();
  await teardown("ended", "Stopped.");
}

function ended(reason, error) {
  if (!live || live.ended) return;
  live.ended = true;
  if (error) showError(error);
  const words = {
    "input ended": "The camera stream ended.",
    "no input": "No video reached the service for too long.",
    stopped: "Stopped.",
    shutdown: "The service shut down.",
    "output closed": "The output was closed.",
  };
  teardown("ended", words[reason] ?? `Ended: ${reason}.`);
}

// -- wiring -------------------------------------------------------------------------------------

function init() {
  initToken();
  ui.setup.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!live) start();
  });
  ui.stop.addEventListener("click", stop);
  ui.pipeline.addEventListener("change", renderParams);
  ui.paramsForm.addEventListener("submit", (event) => event.preventDefault());
  ui.paramsForm.addEventListener("input", paramsChanged);
  ui.paramsForm.addEventListener("change", paramsChanged);
  navigator.mediaDevices?.addEventListener?.("devicechange", listCameras);
  // Leaving the page ends the session rather than leaving it to its input timeout.
  window.addEventListener("pagehide", () => {
    if (!live?.session) return;
    for (const url of [live.whip?.resource, live.whep?.resource]) {
      if (url) fetch(url, { method: "DELETE", keepalive: true, headers: authHeaders() });
    }
    fetch(`/live-video-to-video/${live.session.session_id}`, {
      method: "DELETE",
      keepalive: true,
      headers: authHeaders(),
    });
  });
  listCameras();
  loadPipelines();
}

init();
