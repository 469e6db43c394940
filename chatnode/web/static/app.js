// chatnode web client. Plain modern JavaScript, served as is: no build step, no framework.
//
// Safety rule for this file: text that comes from users or from the server is only ever put
// into the page through textContent / text nodes (see `h`). Nothing is parsed as HTML.
//
// Protocol: docs/PROTOCOL.md (HTTP for accounts and sessions, one WebSocket of JSON frames).

const SESSION_KEY = "chatnode.session";
const ROOM_KEY = "chatnode.room";
const OUTBOX_KEY = "chatnode.outbox"; // unacknowledged own messages, kept across a reload
const MAX_NODES = 64; // node URLs remembered (the page's own node and the cluster's list)
const REACTIONS = ["👍", "❤️", "😂", "🎉", "😮"];
const HISTORY_PAGE = 50;
const BODY_MAX = 4000;
const USER_RE = /^[a-z0-9_][a-z0-9_.-]{1,31}$/;
const ROOM_RE = /^[a-z0-9_][a-z0-9_-]{0,63}$/;
const TYPING_SEND_EVERY_MS = 3000;
const TYPING_SHOW_MS = 5000;
const TYPING_MIN_GAP_MS = 1100; // between two typing frames (the cluster passes on one a second)
const PING_EVERY_MS = 25000;
const PING_TIMEOUT_MS = 10000;
const REQUEST_TIMEOUT_MS = 30000;
const CONNECT_TIMEOUT_MS = 10000; // WebSocket + hello on one node
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
const LIST_REFRESH_MS = 15000;
const SEND_RETRIES = 5;
const RATE_RETRIES = 6;
const SEARCH_PAGE = 20;
const JUMP_PAGE = 200; // history page size while reading back to a search result
const JUMP_PAGES = 50; // at most this many such pages (10,000 messages) per jump
const STATS_DAYS = 30;
const STATS_TOP = 10;
const STATS_ROOMS = 30; // rooms compared in "most active rooms" (one request each)
const SVG_NS = "http://www.w3.org/2000/svg";

const ERROR_TEXT = {
  network: "Cannot reach the server",
  timeout: "The server did not answer in time",
  bad_json: "The server could not read a request",
  bad_frame: "The server rejected a malformed request",
  unknown_op: "The server does not know this operation",
  invalid: "Invalid input",
  unauthenticated: "Not logged in",
  bad_token: "Your session is no longer valid",
  token_expired: "Your session has expired",
  bad_credentials: "Wrong user name or password",
  forbidden: "Not allowed",
  not_found: "Not found",
  conflict: "That name is already taken",
  limit_reached: "Limit reached",
  rate_limited: "Too many requests, slow down",
  too_large: "Request too large",
  unavailable: "The server cannot store this right now",
  internal: "Server error",
};

// ---------------------------------------------------------------- small helpers

const $ = (id) => document.getElementById(id);

// Builds an element. Strings among the children become text nodes; the `text` property sets
// textContent. There is deliberately no way to pass HTML.
function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

class ServerError extends Error {
  constructor(code, message) {
    super(message || code);
    this.code = code;
  }
}

class Disconnected extends Error {
  constructor() {
    super("disconnected");
    this.code = "disconnected";
  }
}

function describe(err) {
  if (typeof err === "string") return err;
  const code = err && err.code;
  const known = code ? ERROR_TEXT[code] : null;
  const detail = err && err.message && err.message !== code ? err.message : "";
  if (known && detail) return `${known} (${code}): ${detail}`;
  if (known) return `${known} (${code})`;
  if (code && detail) return `${code}: ${detail}`;
  return detail || String(err);
}

// Builds an SVG element, like `h`: attributes set one by one, strings as text nodes.
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function newId() {
  // 128 random bits as 32 hex characters; crypto.getRandomValues works outside secure contexts.
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function formatTime(ts) {
  const d = new Date(ts);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function listNames(names) {
  if (names.length <= 1) return names.join("");
  return `${names.slice(0, -1).join(", ")} and ${names[names.length - 1]}`;
}

// ---------------------------------------------------------------- HTTP

async function api(method, path, body, token) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new ServerError("network", "the request did not reach the server");
  }
  if (resp.status === 204) return null;
  let data = null;
  try {
    data = await resp.json();
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const e = data && typeof data === "object" ? data.error : null;
    throw new ServerError(e && e.code ? e.code : `http_${resp.status}`, e && e.message ? e.message : resp.statusText);
  }
  return data;
}

// ---------------------------------------------------------------- WebSocket connection

// One WebSocket with request/reply matching by `ref`. Events (frames without a ref that we
// are waiting for) go to `onEvent`. When the socket closes every waiting request is rejected
// with Disconnected.
class Connection {
  constructor(url, onEvent, onClose) {
    this.onEvent = onEvent;
    this.onClose = onClose;
    this.nextRef = 0;
    this.waiting = new Map();
    this.closed = false;
    this.ws = new WebSocket(url);
    this.opened = new Promise((resolve, reject) => {
      this.ws.addEventListener("open", () => resolve(), { once: true });
      this.ws.addEventListener("close", () => reject(new Disconnected()), { once: true });
    });
    this.opened.catch(() => {});
    this.ws.addEventListener("message", (ev) => this.receive(ev));
    this.ws.addEventListener("close", (ev) => this.closedBy(ev));
  }

  receive(ev) {
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object") return;
    if ((frame.op === "ok" || frame.op === "error") && frame.ref !== undefined && frame.ref !== null) {
      const key = String(frame.ref);
      const w = this.waiting.get(key);
      if (w) {
        this.waiting.delete(key);
        clearTimeout(w.timer);
        if (frame.op === "ok") w.resolve(frame);
        else w.reject(new ServerError(frame.code || "internal", frame.message || ""));
        return;
      }
    }
    this.onEvent(frame);
  }

  // Like requestOnce, but a request dropped by the server's rate limit is retried after a
  // growing pause (a few times), as the protocol asks.
  async request(op, fields = {}, timeoutMs = REQUEST_TIMEOUT_MS) {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await this.requestOnce(op, fields, timeoutMs);
      } catch (e) {
        if (e.code !== "rate_limited" || attempt >= RATE_RETRIES || op === "typing") throw e;
        await new Promise((resolve) => setTimeout(resolve, 300 * attempt));
      }
    }
  }

  requestOnce(op, fields = {}, timeoutMs = REQUEST_TIMEOUT_MS) {
    if (this.closed || this.ws.readyState !== WebSocket.OPEN) return Promise.reject(new Disconnected());
    this.nextRef += 1;
    const ref = `r${this.nextRef}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(ref);
        reject(new ServerError("timeout", `no reply to ${op}`));
        // A connection that stops answering is recycled at once (a stopped node would not
        // answer the close either); requests are replayed on reconnect, to another node.
        this.abandon(4000);
      }, timeoutMs);
      this.waiting.set(ref, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ ...fields, op, ref }));
    });
  }

  close(code = 1000) {
    if (this.closed) return;
    try {
      this.ws.close(code);
    } catch {
      this.ws.close();
    }
  }

  // Gives the socket up now, even if the browser never reports its end: a WebSocket that the
  // page's Content Security Policy refuses is CLOSED at once and fires no event at all.
  abandon(code) {
    this.close(code);
    if (!this.closed) this.closedBy({ code, reason: "abandoned", wasClean: false });
  }

  closedBy(ev) {
    if (this.closed) return; // abandoned before the browser's own close event
    this.closed = true;
    for (const w of this.waiting.values()) {
      clearTimeout(w.timer);
      w.reject(new Disconnected());
    }
    this.waiting.clear();
    this.onClose(ev);
  }
}

// ---------------------------------------------------------------- state

class Room {
  constructor(id) {
    this.id = id;
    this.title = "";
    this.visibility = "public";
    this.member = false;
    this.invited = false; // a private room the user is invited to and may join
    this.unread = 0;
    this.messages = new Map(); // id -> message (confirmed and local)
    this.order = []; // confirmed message ids, ascending by cursor
    this.pendingIds = []; // own messages not acknowledged yet, in the order they were written
    this.lastCursor = null; // cursor of the newest `message` event received (the resume point)
    this.resume = null; // the last `resume` token received for this room (PROTOCOL.md, "Resuming")
    this.historyCursor = null; // newest cursor seen in a `history` reply
    this.more = true; // older history may exist
    this.primed = false; // the newest page (or message) was fetched once
    this.loadingOlder = false;
    this.wanted = false; // keep subscribed across reconnects
    this.subscribed = false; // subscribed on the current connection
    this.subscribing = null; // {conn, done}: a subscription in progress
    this.readSent = null; // newest cursor sent with `read`
    this.typing = new Map(); // user -> time (ms) until which they count as typing
    this.online = new Set();
    this.readers = new Map(); // user -> read cursor
  }
}

const app = {
  session: null, // {user, token, expires}
  conn: null,
  connected: false,
  rooms: new Map(),
  current: null,
  outbox: new Map(), // own messages waiting for an ack (or failed), in creation order
  nodes: new Map(), // node URL -> {url, seed, rank, failures, notBefore, reported}
  nodeUrl: null, // the node of the last successful hello
  nodeId: null, // its id (hello's `node`)
  movedFrom: null, // the node before it, when the page moved
  movedAt: 0, // when it moved (ms)
  moves: 0, // how many times it moved
  reconnectAt: 0,
  reconnectTimer: null,
  countdownTimer: null,
  pingTimer: null,
  listTimer: null,
  readTimer: null,
  lastTypingSent: 0,
  lastTypingFrame: 0, // when the last `typing` frame went out
  typingTimer: null,
  editing: null, // id of the message being edited
  liById: new Map(), // rendered <li> of the current room, by message id
  panel: null, // "search" or "stats" when that view replaces the room, else null
  search: null, // {query, room, next, count, loading}: the search on screen
  found: null, // {room, id}: the search result opened last (highlighted in its room)
  statsSeq: 0, // bumped by each statistics load; an older load's answer is dropped
};

function me() {
  return app.session ? app.session.user : "";
}

function currentRoom() {
  return app.current ? app.rooms.get(app.current) || null : null;
}

function isDm(room) {
  return room.id.startsWith("dm:");
}

function displayName(room) {
  if (isDm(room)) {
    const others = room.id.slice(3).split(":").filter((u) => u !== me());
    return `@${others[0] || me()}`;
  }
  return room.title || `#${room.id}`;
}

function upsertRoom(obj) {
  const id = typeof obj === "string" ? obj : obj && obj.room;
  if (typeof id !== "string") return null;
  let room = app.rooms.get(id);
  if (!room) {
    room = new Room(id);
    app.rooms.set(id, room);
  }
  if (obj && typeof obj === "object") {
    if (typeof obj.title === "string") room.title = obj.title;
    if (obj.visibility === "public" || obj.visibility === "private") room.visibility = obj.visibility;
    if (typeof obj.member === "boolean") room.member = obj.member;
    room.invited = obj.invited === true && !room.member;
    if (typeof obj.unread === "number" && !(room.id === app.current && isSeeingBottom())) {
      room.unread = obj.unread;
    }
  }
  return room;
}

// ---------------------------------------------------------------- banner and status

let bannerTimer = null;

function showBanner(text, kind) {
  const banner = $("banner");
  $("banner-text").textContent = text;
  banner.dataset.kind = kind;
  banner.setAttribute("role", kind === "error" ? "alert" : "status");
  banner.hidden = false;
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => {
    banner.hidden = true;
  }, kind === "error" ? 12000 : 4000);
}

function showError(err, context) {
  const text = describe(err);
  showBanner(context ? `${context}: ${text}` : text, "error");
}

function showInfo(text) {
  showBanner(text, "info");
}

function setStatus(stateName) {
  const box = $("conn-status");
  box.dataset.state = stateName;
  const text = $("conn-text");
  const retry = $("reconnect-btn");
  clearInterval(app.countdownTimer);
  app.countdownTimer = null;
  retry.hidden = stateName !== "offline";
  if (stateName === "connected") text.textContent = "Connected";
  else if (stateName === "connecting") text.textContent = "Connecting…";
  else {
    const tick = () => {
      const secs = Math.max(0, Math.ceil((app.reconnectAt - Date.now()) / 1000));
      text.textContent = secs > 0 ? `Offline, retrying in ${secs} s` : "Offline, retrying…";
    };
    tick();
    app.countdownTimer = setInterval(tick, 1000);
  }
  renderNodeLine(stateName);
}

function nodeName(url) {
  try {
    const u = new URL(url);
    return u.host + (u.pathname === "/" ? "" : u.pathname);
  } catch {
    return String(url);
  }
}

// The small status line next to the connection state: which node the page talks to and,
// after a failover, where it came from and when.
function renderNodeLine(stateName) {
  const line = $("conn-node");
  const conn = app.conn;
  const trying = conn && !conn.closed ? conn.nodeUrl : null;
  let text = "";
  if (stateName === "connected" && app.nodeUrl) {
    text = `on ${nodeName(app.nodeUrl)}`;
    if (app.movedFrom) {
      const at = new Date(app.movedAt).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
      text += ` · moved from ${nodeName(app.movedFrom)} at ${at}`;
    }
  } else if (stateName === "connecting" && trying) text = `trying ${nodeName(trying)}`;
  else if (app.nodeUrl) text = `was on ${nodeName(app.nodeUrl)}`;
  line.textContent = text;
  line.title = stateName === "connected" && app.nodeId ? `node ${app.nodeId}, ${app.nodeUrl}` : "";
  line.dataset.node = stateName === "connected" && app.nodeUrl ? app.nodeUrl : "";
  line.dataset.moves = String(app.moves);
}

// ---------------------------------------------------------------- session and auth screen

function loadSession() {
  try {
    const raw = sessionStorage.getItem(SESSION_KEY);
    if (!raw) return null;
    const s = JSON.parse(raw);
    if (!s || typeof s.token !== "string" || typeof s.user !== "string") return null;
    if (typeof s.expires === "number" && s.expires * (s.expires < 1e12 ? 1000 : 1) < Date.now()) return null;
    return s;
  } catch {
    return null;
  }
}

function saveSession(s) {
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(s));
}

function showAuth(message, kind = "error") {
  $("main").hidden = true;
  $("auth").hidden = false;
  const err = $("auth-error");
  err.textContent = message || "";
  err.dataset.kind = kind;
  document.title = "chatnode";
  $("auth-user").focus();
}

async function authenticate(kind) {
  const user = $("auth-user").value.trim().toLowerCase();
  const password = $("auth-password").value;
  const err = $("auth-error");
  err.textContent = "";
  if (!USER_RE.test(user)) {
    err.textContent = "User names are 2–32 characters: lower-case letters, digits, _ . and -, not starting with . or -.";
    $("auth-user").focus();
    return;
  }
  if (password.length < 8 || password.length > 256) {
    err.textContent = "Passwords are 8–256 characters.";
    $("auth-password").focus();
    return;
  }
  const buttons = [$("login-btn"), $("signup-btn")];
  for (const b of buttons) b.disabled = true;
  try {
    const path = kind === "signup" ? "v1/accounts" : "v1/sessions";
    const res = await api("POST", path, { user, password });
    if (!res || typeof res.token !== "string") throw new ServerError("internal", "no token in the reply");
    app.session = { user: res.user || user, token: res.token, expires: res.expires };
    saveSession(app.session);
    $("auth-password").value = "";
    startMain();
  } catch (e) {
    err.dataset.kind = "error";
    err.textContent = describe(e);
  } finally {
    for (const b of buttons) b.disabled = false;
  }
}

function startMain() {
  $("auth").hidden = true;
  $("main").hidden = false;
  $("me-name").textContent = me();
  const saved = sessionStorage.getItem(ROOM_KEY);
  app.current = saved && !app.current ? saved : app.current;
  restoreOutbox();
  renderRoomList();
  renderRoomView();
  addNode(pageNode(), true);
  loadNodes();
  connect();
  clearInterval(app.listTimer);
  app.listTimer = setInterval(() => {
    if (app.connected) refreshRooms(app.conn).catch(() => {});
  }, LIST_REFRESH_MS);
}

function resetState() {
  clearTimeout(app.reconnectTimer);
  clearInterval(app.countdownTimer);
  clearInterval(app.pingTimer);
  clearInterval(app.listTimer);
  clearTimeout(app.readTimer);
  const conn = app.conn;
  app.conn = null;
  app.connected = false;
  if (conn) conn.close();
  app.session = null;
  app.rooms = new Map();
  app.outbox = new Map();
  app.current = null;
  app.editing = null;
  app.liById = new Map();
  app.panel = null;
  app.search = null;
  app.found = null;
  $("search-view").hidden = true;
  $("stats-view").hidden = true;
  $("search-results").replaceChildren();
  for (const node of app.nodes.values()) node.notBefore = 0;
  sessionStorage.removeItem(SESSION_KEY);
  sessionStorage.removeItem(ROOM_KEY);
  sessionStorage.removeItem(OUTBOX_KEY);
  $("message-list").replaceChildren();
}

async function logout() {
  const session = app.session;
  resetState();
  showAuth("");
  if (!session) return;
  try {
    await api("DELETE", "v1/sessions", undefined, session.token);
    showAuth("You are logged out.", "info");
  } catch (e) {
    if (e.code === "bad_token" || e.code === "token_expired") showAuth("You are logged out.", "info");
    else showAuth(`Logged out here, but the server could not revoke the session: ${describe(e)}`);
  }
}

function sessionEnded(err) {
  resetState();
  showAuth(`${describe(err)}. Please log in again.`);
}

// ---------------------------------------------------------------- connecting and resuming

// ---- the nodes (PROTOCOL.md, "Finding the nodes")
//
// The page knows its own node (the URL it was loaded from: a node, or a load balancer) and
// the cluster's list of alive members (GET /v1/nodes, then every hello's `nodes`). After a
// connection fails or breaks, that node waits out a backoff (0.5 s doubling to 15 s, a random
// half to all of it) and the page moves at once to the best other node: the page's own node
// or one the cluster listed as alive, then the fewest failures in a row, then the page's own
// node, then a random order drawn once per page (so the pages of a dead node spread out).

function normalizeNodeUrl(raw) {
  if (typeof raw !== "string") return null;
  let u;
  try {
    u = new URL(raw);
  } catch {
    return null;
  }
  if ((u.protocol !== "http:" && u.protocol !== "https:") || !u.hostname) return null;
  if (u.search || u.hash || u.username || u.password) return null;
  return `${u.protocol}//${u.host}${u.pathname.replace(/\/+$/, "")}`;
}

// The URL the page was loaded from, as a node URL (the directory of index.html).
function pageNode() {
  return normalizeNodeUrl(new URL(".", window.location.href).href);
}

function addNode(url, seed) {
  if (!url) return null;
  let node = app.nodes.get(url);
  if (!node && app.nodes.size < MAX_NODES) {
    node = { url, seed, rank: seed ? -1 : Math.random(), failures: 0, notBefore: 0, reported: false };
    app.nodes.set(url, node);
  }
  if (node && seed) node.seed = true;
  return node || null;
}

// The cluster's list of its alive members: mark them, add the new ones, forget the nodes it
// no longer lists (except the page's own node and the one in use).
function reportNodes(list) {
  if (!Array.isArray(list)) return;
  const alive = new Set(list.map(normalizeNodeUrl).filter(Boolean));
  if (!alive.size) return;
  for (const node of app.nodes.values()) node.reported = alive.has(node.url);
  for (const url of alive) {
    const node = addNode(url, false);
    if (node) node.reported = true;
  }
  const inUse = app.conn && !app.conn.closed ? app.conn.nodeUrl : null;
  for (const [url, node] of app.nodes) {
    if (!node.seed && !node.reported && url !== inUse) app.nodes.delete(url);
  }
}

async function loadNodes() {
  try {
    const res = await api("GET", "v1/nodes");
    if (res) reportNodes(res.nodes);
  } catch {
    // hello says the same once connected
  }
}

function nodeKey(node) {
  return [node.seed || node.reported ? 0 : 1, node.failures, node.rank];
}

// The node to try now, or null when every node waits out its backoff.
function pickNode(now) {
  let best = null;
  let bestKey = null;
  for (const node of app.nodes.values()) {
    if (node.notBefore > now) continue;
    const key = nodeKey(node);
    const better = !best || key[0] - bestKey[0] || key[1] - bestKey[1] || key[2] - bestKey[2];
    if (!best || better < 0) {
      best = node;
      bestKey = key;
    }
  }
  return best;
}

// Milliseconds until pickNode returns a node.
function nodeWait(now) {
  let soonest = Infinity;
  for (const node of app.nodes.values()) soonest = Math.min(soonest, node.notBefore);
  return soonest === Infinity ? BACKOFF_MIN_MS : Math.max(0, soonest - now);
}

function nodeFailed(url) {
  const node = app.nodes.get(url);
  if (!node) return;
  node.failures += 1;
  const full = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(node.failures - 1, 20));
  node.notBefore = Date.now() + Math.round(full / 2 + Math.random() * (full / 2));
}

function nodeConnected(url, id) {
  const node = app.nodes.get(url) || addNode(url, false);
  if (node) {
    node.failures = 0;
    node.notBefore = 0;
  }
  if (app.nodeUrl && app.nodeUrl !== url) {
    app.movedFrom = app.nodeUrl;
    app.movedAt = Date.now();
    app.moves += 1;
  }
  app.nodeUrl = url;
  app.nodeId = typeof id === "string" ? id : null;
}

// "Reconnect now", or the browser is back online: every node may be tried at once.
function retryNow() {
  for (const node of app.nodes.values()) node.notBefore = 0;
  connect();
}

function wsUrl(base) {
  const url = new URL("v1/ws", `${base}/`);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

function connect() {
  if (!app.session) return;
  clearTimeout(app.reconnectTimer);
  app.reconnectTimer = null;
  if (app.conn && !app.conn.closed) return;
  const node = pickNode(Date.now());
  if (!node) {
    scheduleReconnect();
    return;
  }
  let conn = null;
  try {
    conn = new Connection(wsUrl(node.url), onEvent, () => onConnectionClosed(conn));
  } catch {
    conn = null;
  }
  if (!conn || conn.ws.readyState === WebSocket.CLOSED) {
    // The browser refused at once, without an event (a node the page's Content Security
    // Policy does not list, such as one that joined after the page was loaded): try another.
    nodeFailed(node.url);
    scheduleReconnect();
    return;
  }
  conn.nodeUrl = node.url;
  // A node that does not answer at all (a machine that is gone drops the packets) is given
  // up after CONNECT_TIMEOUT_MS, like one that refuses.
  conn.connectTimer = setTimeout(() => conn.abandon(4000), CONNECT_TIMEOUT_MS);
  app.conn = conn;
  setStatus("connecting");
  conn.opened.then(() => onConnectionOpen(conn), () => {});
}

// Reconnects as soon as a node may be tried: at once when another node is ready.
function scheduleReconnect() {
  const now = Date.now();
  const wait = nodeWait(now);
  clearTimeout(app.reconnectTimer);
  app.reconnectAt = now + wait;
  app.reconnectTimer = setTimeout(connect, wait);
  setStatus("offline");
}

async function onConnectionOpen(conn) {
  try {
    const res = await conn.request("hello", { token: app.session.token });
    if (conn !== app.conn) return;
    if (typeof res.user === "string" && res.user !== app.session.user) {
      app.session.user = res.user;
      saveSession(app.session);
      $("me-name").textContent = res.user;
    }
    clearTimeout(conn.connectTimer);
    app.connected = true;
    nodeConnected(conn.nodeUrl, res.node);
    reportNodes(res.nodes);
    setStatus("connected");
    clearInterval(app.pingTimer);
    app.pingTimer = setInterval(() => {
      conn.request("ping", {}, PING_TIMEOUT_MS).catch(() => {});
    }, PING_EVERY_MS);
    await resume(conn);
  } catch (e) {
    if (conn !== app.conn) return;
    if (e.code === "bad_token" || e.code === "token_expired" || e.code === "unauthenticated") {
      sessionEnded(e);
      return;
    }
    if (!(e instanceof Disconnected)) {
      showError(e, "Could not start the session");
      conn.close(4001);
    }
  }
}

function onConnectionClosed(conn) {
  if (conn !== app.conn) return;
  app.connected = false;
  clearInterval(app.pingTimer);
  for (const room of app.rooms.values()) {
    room.subscribed = false;
    room.loadingOlder = false;
    room.typing.clear();
    room.online.clear();
  }
  for (const msg of app.outbox.values()) msg.inflight = false;
  clearTimeout(conn.connectTimer);
  nodeFailed(conn.nodeUrl);
  if (!app.session) return;
  renderPresence();
  renderTyping();
  scheduleReconnect(); // at once to another node if one is ready
}

// After a successful hello: re-subscribe where we were (each room from its last cursor, so
// nothing is skipped and nothing is delivered twice), learn new rooms, then resend the
// messages that were never acknowledged, with their original ids.
async function resume(conn) {
  const known = [...app.rooms.values()].filter((r) => r.wanted);
  await Promise.all(known.map((r) => subscribeRoom(conn, r)));
  await refreshRooms(conn);
  const fresh = [...app.rooms.values()].filter((r) => r.member && !r.subscribed && !r.wanted);
  await Promise.all(fresh.map((r) => subscribeRoom(conn, r)));
  if (fresh.length) await refreshRooms(conn); // authoritative unread counts after catch-up
  if (conn !== app.conn) return;
  for (const msg of app.outbox.values()) transmit(msg);
  const room = currentRoom();
  if (app.current && (!room || !room.member)) {
    app.current = null;
    sessionStorage.removeItem(ROOM_KEY);
    renderRoomView();
  } else if (room) {
    if ($("room-view").hidden) {
      renderRoomView();
      scrollToBottom();
    }
    if (!room.subscribed) await subscribeRoom(conn, room);
    requestPresence(room);
    fillHistory(room);
    scheduleRead();
  }
  renderRoomList();
}

async function refreshRooms(conn) {
  const res = await conn.request("rooms.list");
  const seen = new Set();
  for (const obj of Array.isArray(res.rooms) ? res.rooms : []) {
    const room = upsertRoom(obj);
    if (room) seen.add(room.id);
  }
  for (const [id, room] of app.rooms) {
    if (!seen.has(id) && id !== app.current) app.rooms.delete(id);
    else if (!seen.has(id)) room.member = false;
  }
  renderRoomList();
}

// Follows a room on this connection without a gap: the first time, the newest messages are
// read with `history` and the subscription starts after the newest of them; afterwards it
// resumes after the last `message` event received (PROTOCOL.md, "Resuming").
function subscribeRoom(conn, room) {
  // One subscription attempt per room and connection at a time.
  if (room.subscribing && room.subscribing.conn === conn) return room.subscribing.done;
  const done = doSubscribe(conn, room).finally(() => {
    if (room.subscribing && room.subscribing.done === done) room.subscribing = null;
  });
  room.subscribing = { conn, done };
  return done;
}

async function doSubscribe(conn, room) {
  room.wanted = true;
  try {
    const stick = isCurrent(room) && isAtBottom();
    if (!room.primed) {
      // A full page for the room on screen; one message otherwise, enough to resume from.
      const limit = room.id === app.current ? HISTORY_PAGE : 1;
      await loadLatest(conn, room, limit);
      room.primed = true;
    }
    const after = room.lastCursor || room.historyCursor;
    const req = { room: room.id };
    if (after) req.after = after;
    if (room.resume) req.resume = room.resume;
    const res = await conn.request("subscribe", req);
    if (res && typeof res.resume === "string") room.resume = res.resume;
    if (!after) {
      // No cursor to resume from (the room was empty): without `after` there is no catch-up
      // (a token alone is only exact on the node that issued it), so read again what may
      // have arrived before the subscription took effect; messages merge by id. Testing the
      // token here instead missed such a message: the subscribe reply carries one.
      await loadLatest(conn, room, HISTORY_PAGE);
    }
    room.subscribed = true;
    if (stick) scrollToBottom();
    renderHistoryStatus();
  } catch (e) {
    if (e.code === "forbidden" || e.code === "not_found") {
      room.wanted = false;
      room.member = false;
    } else if (!(e instanceof Disconnected)) {
      showError(e, `Could not follow ${displayName(room)}`);
    }
  }
}

async function loadLatest(conn, room, limit) {
  const res = await conn.request("history", { room: room.id, limit });
  const messages = Array.isArray(res.messages) ? res.messages : [];
  for (const m of messages) ingest(room, m, "history");
  if (!room.primed || !room.order.length) room.more = Boolean(res.more);
}

function requestPresence(room) {
  if (!app.connected) return;
  app.conn
    .request("presence", { room: room.id })
    .then((res) => {
      room.online = new Set(Array.isArray(res.users) ? res.users : []);
      if (isCurrent(room)) renderPresence();
    })
    .catch(() => {});
}

// ---------------------------------------------------------------- events from the server

function onEvent(frame) {
  switch (frame.op) {
    case "message":
      onMessage(frame, false);
      break;
    case "update":
      onMessage(frame, true);
      break;
    case "caught_up": {
      const room = app.rooms.get(frame.room);
      if (room && typeof frame.resume === "string") room.resume = frame.resume;
      break;
    }
    case "presence":
      onPresence(frame);
      break;
    case "typing":
      onTyping(frame);
      break;
    case "read":
      onRead(frame);
      break;
    case "error":
      showError(new ServerError(frame.code || "internal", frame.message || ""));
      break;
    default:
      break;
  }
}

function isCurrent(room) {
  return room !== null && room.id === app.current;
}

function onMessage(frame, isUpdate) {
  const room = app.rooms.get(frame.room);
  if (!room) return;
  const seeing = isCurrent(room) && isSeeingBottom();
  const isNew = ingest(room, frame, isUpdate ? "update" : "live");
  if (isNew && frame.author !== me() && !frame.deleted && !seeing) {
    room.unread += 1;
    renderRoomList();
  }
  if (isNew && room.typing.delete(frame.author) && isCurrent(room)) renderTyping();
  if (seeing) scrollToBottom();
  if (isCurrent(room)) {
    renderHistoryStatus();
    renderSeenBy();
    scheduleRead();
  }
}

// Merges a message (from history, a live event or an update) into the room. Returns true
// when it is a message we had never seen (deduplication is by message id).
function ingest(room, m, source) {
  if (!m || typeof m.id !== "string") return false;
  if ((source === "live" || source === "update") && typeof m.resume === "string") room.resume = m.resume;
  if (typeof m.cursor === "string") {
    if (source === "live" && (!room.lastCursor || m.cursor > room.lastCursor)) room.lastCursor = m.cursor;
    if (source === "history" && (!room.historyCursor || m.cursor > room.historyCursor)) room.historyCursor = m.cursor;
  }
  const known = room.messages.get(m.id);
  if (known) {
    const wasLocal = Boolean(known.local);
    const moved = !wasLocal && typeof m.cursor === "string" && known.cursor && m.cursor !== known.cursor;
    Object.assign(known, pickMessage(m));
    if (moved) {
      // a duplicate copy of this id was resolved (`replaces`): the message now stands here
      const at = room.order.indexOf(known.id);
      if (at >= 0) room.order.splice(at, 1);
      insertSorted(room, known);
      return false;
    }
    if (wasLocal && known.cursor) settle(room, known);
    else if (isCurrent(room)) renderMessage(known);
    return false;
  }
  if (source === "update") return false; // an update of a message older than what we hold
  if (typeof m.cursor !== "string") return false;
  const msg = { ...pickMessage(m), id: m.id, local: null };
  room.messages.set(msg.id, msg);
  insertSorted(room, msg);
  return true;
}

function pickMessage(m) {
  const out = {};
  if (typeof m.author === "string") out.author = m.author;
  if (typeof m.body === "string") out.body = m.body;
  if (typeof m.ts === "number") out.ts = m.ts;
  if (typeof m.cursor === "string") out.cursor = m.cursor;
  if (m.edited !== undefined) out.edited = Boolean(m.edited);
  if (m.deleted !== undefined) out.deleted = Boolean(m.deleted);
  if (m.reactions && typeof m.reactions === "object") out.reactions = m.reactions;
  return out;
}

function insertSorted(room, msg) {
  const order = room.order;
  let lo = 0;
  let hi = order.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (room.messages.get(order[mid]).cursor < msg.cursor) lo = mid + 1;
    else hi = mid;
  }
  order.splice(lo, 0, msg.id);
  if (isCurrent(room)) placeMessage(room, msg, lo);
}

// An own message was acknowledged (by the `ok` of its send, or by its echo as an event).
function settle(room, msg) {
  msg.local = null;
  msg.error = null;
  msg.inflight = false;
  app.outbox.delete(msg.id);
  saveOutbox();
  const i = room.pendingIds.indexOf(msg.id);
  if (i >= 0) room.pendingIds.splice(i, 1);
  insertSorted(room, msg);
  if (isCurrent(room)) renderMessage(msg);
}

function onPresence(frame) {
  const room = app.rooms.get(frame.room);
  if (!room || typeof frame.user !== "string") return;
  if (frame.online) room.online.add(frame.user);
  else {
    room.online.delete(frame.user);
    room.typing.delete(frame.user);
  }
  if (isCurrent(room)) {
    renderPresence();
    renderTyping();
  }
}

function onTyping(frame) {
  const room = app.rooms.get(frame.room);
  if (!room || typeof frame.user !== "string" || frame.user === me()) return;
  room.typing.set(frame.user, Date.now() + TYPING_SHOW_MS);
  if (isCurrent(room)) renderTyping();
}

function onRead(frame) {
  const room = app.rooms.get(frame.room);
  if (!room || typeof frame.user !== "string" || typeof frame.cursor !== "string") return;
  const prev = room.readers.get(frame.user);
  if (!prev || frame.cursor > prev) room.readers.set(frame.user, frame.cursor);
  if (isCurrent(room)) renderSeenBy();
}

// ---------------------------------------------------------------- sending and changing messages

function sendFromComposer() {
  const room = currentRoom();
  const input = $("composer-input");
  const body = input.value.trim();
  if (!room || !body) return;
  const length = [...body].length; // the protocol counts code points
  if (length > BODY_MAX) {
    showError(`A message is at most ${BODY_MAX.toLocaleString()} characters (this one has ${length.toLocaleString()}).`);
    return;
  }
  const msg = addPending(room, newId(), body, Date.now(), "pending", null);
  saveOutbox();
  placeMessage(room, msg, null);
  renderHistoryStatus();
  scrollToBottom();
  input.value = "";
  autosize(input);
  app.lastTypingSent = 0;
  transmit(msg);
}

// An own message waiting for its acknowledgement (or refused: `local` "failed").
function addPending(room, id, body, ts, local, error) {
  const msg = {
    id,
    room: room.id,
    author: me(),
    body,
    ts,
    cursor: null,
    edited: false,
    deleted: false,
    reactions: {},
    local,
    inflight: false,
    tries: 0,
    error,
  };
  room.messages.set(msg.id, msg);
  room.pendingIds.push(msg.id);
  app.outbox.set(msg.id, msg);
  return msg;
}

// The outbox is kept in sessionStorage, so that messages written while offline survive a
// reload of the page; they go out (once: same ids) when it connects again.
function saveOutbox() {
  if (!app.session) return;
  const items = [...app.outbox.values()].map((m) => ({
    id: m.id,
    room: m.room,
    body: m.body,
    ts: m.ts,
    failed: m.local === "failed" ? m.error || "Not sent." : null,
  }));
  try {
    if (items.length) sessionStorage.setItem(OUTBOX_KEY, JSON.stringify({ user: me(), items }));
    else sessionStorage.removeItem(OUTBOX_KEY);
  } catch {
    // storage full or disabled: the messages are still kept by this page
  }
}

function restoreOutbox() {
  let saved = null;
  try {
    saved = JSON.parse(sessionStorage.getItem(OUTBOX_KEY) || "null");
  } catch {
    saved = null;
  }
  if (!saved || saved.user !== me() || !Array.isArray(saved.items)) return;
  for (const it of saved.items) {
    if (!it || typeof it.id !== "string" || typeof it.room !== "string" || typeof it.body !== "string") continue;
    if (app.outbox.has(it.id)) continue;
    const room = upsertRoom(it.room);
    if (!room || room.messages.has(it.id)) continue;
    room.member = true; // it was written there; rooms.list says otherwise if that changed
    const failed = typeof it.failed === "string" ? it.failed : null;
    addPending(room, it.id, it.body, typeof it.ts === "number" ? it.ts : Date.now(), failed ? "failed" : "pending", failed);
  }
}

async function transmit(msg) {
  if (msg.local !== "pending" || msg.inflight || !app.connected) return; // sent on reconnect
  const conn = app.conn;
  msg.inflight = true;
  try {
    const res = await conn.request("send", { room: msg.room, id: msg.id, body: msg.body });
    const room = app.rooms.get(msg.room);
    if (msg.local && room) {
      if (typeof res.cursor === "string") msg.cursor = res.cursor;
      if (typeof res.ts === "number") msg.ts = res.ts;
      if (msg.cursor) settle(room, msg);
    } else if (!room) {
      app.outbox.delete(msg.id); // stored; its room is no longer listed here
      saveOutbox();
    }
  } catch (e) {
    msg.inflight = false;
    if (e instanceof Disconnected || e.code === "timeout") return; // resent after reconnecting
    if ((e.code === "rate_limited" || e.code === "unavailable") && msg.tries < SEND_RETRIES) {
      msg.tries += 1;
      setTimeout(() => transmit(msg), 1000 * msg.tries);
      return;
    }
    msg.local = "failed";
    msg.error = describe(e);
    const room = app.rooms.get(msg.room);
    if (!room) app.outbox.delete(msg.id); // nowhere left to show it (or retry it from)
    saveOutbox();
    if (room && isCurrent(room)) renderMessage(msg);
    showError(e, "Message not sent");
  }
}

function retry(msg) {
  msg.local = "pending";
  msg.error = null;
  msg.tries = 0;
  saveOutbox();
  renderMessage(msg);
  transmit(msg);
}

function discard(room, msg) {
  app.outbox.delete(msg.id);
  saveOutbox();
  room.messages.delete(msg.id);
  const i = room.pendingIds.indexOf(msg.id);
  if (i >= 0) room.pendingIds.splice(i, 1);
  const li = app.liById.get(msg.id);
  if (li) li.remove();
  app.liById.delete(msg.id);
}

async function call(op, fields, context) {
  if (!app.connected) {
    showError("Not connected; try again when the connection is back.", context);
    return null;
  }
  try {
    return await app.conn.request(op, fields);
  } catch (e) {
    showError(e, context);
    return null;
  }
}

async function saveEdit(room, msg, body) {
  const text = body.trim();
  if (!text) return;
  if ([...text].length > BODY_MAX) {
    showError(`A message is at most ${BODY_MAX.toLocaleString()} characters.`);
    return;
  }
  if (text === msg.body) {
    stopEditing();
    return;
  }
  const res = await call("edit", { room: room.id, id: msg.id, body: text }, "Could not edit");
  if (res) {
    msg.body = text;
    msg.edited = true;
    stopEditing();
  }
}

async function deleteMessage(room, msg) {
  const res = await call("delete", { room: room.id, id: msg.id }, "Could not delete");
  if (res) {
    msg.deleted = true;
    msg.body = "";
    renderMessage(msg);
  }
}

async function toggleReaction(room, msg, emoji) {
  const users = (msg.reactions && msg.reactions[emoji]) || [];
  const on = !users.includes(me());
  const res = await call("react", { room: room.id, id: msg.id, emoji, on }, "Could not react");
  if (res) {
    const now = (msg.reactions && msg.reactions[emoji]) || [];
    const next = on ? [...new Set([...now, me()])] : now.filter((u) => u !== me());
    msg.reactions = { ...msg.reactions, [emoji]: next };
    if (!next.length) delete msg.reactions[emoji];
    renderMessage(msg);
  }
}

function startEditing(msg) {
  const previous = app.editing;
  app.editing = msg.id;
  if (previous && previous !== msg.id) {
    const room = currentRoom();
    const other = room && room.messages.get(previous);
    if (other) renderMessage(other);
  }
  renderMessage(msg);
  const li = app.liById.get(msg.id);
  const area = li && li.querySelector("textarea");
  if (area) {
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }
}

function stopEditing() {
  const id = app.editing;
  app.editing = null;
  const room = currentRoom();
  const msg = room && id ? room.messages.get(id) : null;
  if (msg) renderMessage(msg);
}

// ---------------------------------------------------------------- rooms

async function openRoom(id) {
  let room = app.rooms.get(id);
  if (!room) return;
  if (app.found && app.found.room !== id) app.found = null;
  if (app.panel) showPanel(null);
  if (!room.member) {
    const res = await call("rooms.join", { room: id }, `Could not join ${displayName(room)}`);
    if (!res) return;
    room = upsertRoom(res.room || id) || room;
    room.member = true;
  }
  app.current = room.id;
  app.editing = null;
  sessionStorage.setItem(ROOM_KEY, room.id);
  renderRoomList();
  renderRoomView();
  scrollToBottom();
  $("composer-input").focus();
  if (app.connected) {
    if (!room.subscribed) await subscribeRoom(app.conn, room);
    if (!isCurrent(room)) return;
    scrollToBottom();
    requestPresence(room);
    fillHistory(room);
  }
  scheduleRead();
}

async function createRoom(ev) {
  ev.preventDefault();
  const id = $("create-id").value.trim().toLowerCase();
  const title = $("create-title").value.trim();
  const visibility = document.querySelector('input[name="visibility"]:checked').value;
  if (!ROOM_RE.test(id)) {
    showError("Room ids are 1–64 characters: lower-case letters, digits, _ and -, not starting with -.");
    $("create-id").focus();
    return;
  }
  const fields = { room: id, visibility };
  if (title) fields.title = title;
  const res = await call("rooms.create", fields, "Could not create the room");
  if (!res) return;
  const room = upsertRoom(res.room || id) || upsertRoom(id);
  room.member = true;
  room.visibility = visibility;
  if (title && !room.title) room.title = title;
  room.primed = true; // a new room has no history
  room.more = false;
  $("create-id").value = "";
  $("create-title").value = "";
  await openRoom(room.id);
}

async function joinRoom(ev) {
  ev.preventDefault();
  const id = $("join-id").value.trim().toLowerCase();
  if (!ROOM_RE.test(id)) {
    showError("That is not a valid room id.");
    return;
  }
  const res = await call("rooms.join", { room: id }, `Could not join #${id}`);
  if (!res) return;
  const room = upsertRoom(res.room || id) || upsertRoom(id);
  room.member = true;
  $("join-id").value = "";
  await openRoom(room.id);
}

async function openDm(ev) {
  ev.preventDefault();
  const user = $("dm-user").value.trim().toLowerCase();
  if (!USER_RE.test(user)) {
    showError("That is not a valid user name.");
    return;
  }
  const res = await call("dm.open", { user }, `Could not open a conversation with ${user}`);
  if (!res) return;
  const room = upsertRoom(res.room);
  if (!room) return;
  room.member = true;
  if (room.visibility !== "private") room.visibility = "private";
  $("dm-user").value = "";
  await openRoom(room.id);
}

async function inviteUser(ev) {
  ev.preventDefault();
  const room = currentRoom();
  const user = $("invite-user").value.trim().toLowerCase();
  if (!room || !user) return;
  const res = await call("rooms.invite", { room: room.id, user }, `Could not invite ${user}`);
  if (res) {
    $("invite-user").value = "";
    showInfo(`${user} is invited to ${displayName(room)}.`);
  }
}

async function leaveRoom() {
  const room = currentRoom();
  if (!room) return;
  if (room.subscribed) await call("unsubscribe", { room: room.id }, null).catch(() => null);
  const res = await call("rooms.leave", { room: room.id }, `Could not leave ${displayName(room)}`);
  if (!res) return;
  room.member = false;
  room.wanted = false;
  room.subscribed = false;
  if (room.visibility === "private") app.rooms.delete(room.id);
  app.current = null;
  sessionStorage.removeItem(ROOM_KEY);
  renderRoomList();
  renderRoomView();
}

// ---------------------------------------------------------------- history and read markers

function isAtBottom() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 48;
}

function isSeeingBottom() {
  return document.visibilityState === "visible" && !$("main").hidden && !$("room-view").hidden && isAtBottom();
}

function scrollToBottom() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

async function loadOlder(room, limit = HISTORY_PAGE) {
  if (room.loadingOlder || !room.more || !app.connected || !room.primed) return false;
  room.loadingOlder = true;
  renderHistoryStatus();
  const first = room.order.length ? room.messages.get(room.order[0]).cursor : null;
  const req = { room: room.id, limit };
  if (first) req.before = first;
  let loaded = false;
  try {
    const res = await app.conn.request("history", req);
    const box = $("messages");
    const before = box.scrollHeight;
    const top = box.scrollTop;
    for (const m of res.messages || []) ingest(room, m, "history");
    room.more = Boolean(res.more) && (res.messages || []).length > 0;
    if (isCurrent(room)) box.scrollTop = first ? top + (box.scrollHeight - before) : box.scrollHeight;
    loaded = true;
  } catch (e) {
    if (!(e instanceof Disconnected)) showError(e, "Could not load older messages");
  } finally {
    room.loadingOlder = false;
    renderHistoryStatus();
  }
  return loaded;
}

// Loads older pages until the message list can scroll (or there is nothing older).
async function fillHistory(room) {
  const box = $("messages");
  for (let i = 0; i < 20 && isCurrent(room) && room.more; i += 1) {
    if (box.scrollHeight > box.clientHeight + 120 && room.order.length >= HISTORY_PAGE) break;
    if (!(await loadOlder(room))) break;
  }
}

function onScroll() {
  const room = currentRoom();
  if (!room) return;
  if ($("messages").scrollTop < 120) loadOlder(room);
  scheduleRead();
}

function scheduleRead() {
  clearTimeout(app.readTimer);
  app.readTimer = setTimeout(markRead, 250);
}

// Sends `read` with the cursor of the last message visible on screen.
function markRead() {
  const room = currentRoom();
  if (!room || !app.connected || document.visibilityState !== "visible") return;
  const box = $("messages").getBoundingClientRect();
  let cursor = null;
  let index = -1;
  for (let i = room.order.length - 1; i >= 0; i -= 1) {
    const li = app.liById.get(room.order[i]);
    if (!li) continue;
    const r = li.getBoundingClientRect();
    if (r.top < box.bottom - 4) {
      cursor = room.messages.get(room.order[i]).cursor;
      index = i;
      break;
    }
  }
  if (!cursor) return;
  let unread = 0;
  for (let i = index + 1; i < room.order.length; i += 1) {
    const m = room.messages.get(room.order[i]);
    if (m.author !== me() && !m.deleted) unread += 1;
  }
  if (room.unread !== unread) {
    room.unread = unread;
    renderRoomList();
  }
  if (room.readSent && cursor <= room.readSent) return;
  room.readSent = cursor;
  app.conn.request("read", { room: room.id, cursor }).catch((e) => {
    if (!(e instanceof Disconnected)) room.readSent = null;
  });
}

// ---------------------------------------------------------------- rendering

function renderRoomList() {
  const rooms = [...app.rooms.values()];
  const byName = (a, b) => displayName(a).localeCompare(displayName(b));
  const channels = rooms.filter((r) => !isDm(r) && (r.member || r.invited || r.visibility === "public")).sort(
    (a, b) => Number(b.member) - Number(a.member) || byName(a, b),
  );
  const dms = rooms.filter((r) => isDm(r) && r.member).sort(byName);
  $("room-list").replaceChildren(...channels.map(roomItem));
  $("dm-list").replaceChildren(...dms.map(roomItem));
  if (!channels.length) $("room-list").append(h("li", { class: "muted empty-list", text: "No rooms yet." }));
  if (!dms.length) $("dm-list").append(h("li", { class: "muted empty-list", text: "None yet." }));
  const total = rooms.reduce((n, r) => n + (r.member ? r.unread : 0), 0);
  document.title = total ? `(${total}) chatnode` : "chatnode";
}

function roomItem(room) {
  const current = room.id === app.current;
  return h(
    "li",
    {},
    h(
      "button",
      {
        type: "button",
        class: `room-item${current ? " current" : ""}${room.unread ? " has-unread" : ""}`,
        "aria-current": current ? "page" : null,
        dataset: { room: room.id },
        onclick: () => openRoom(room.id),
      },
      h("span", { class: "room-name", text: displayName(room) }),
      room.visibility === "private" && !isDm(room) ? h("span", { class: "tag", text: "private" }) : null,
      room.member ? null : h("span", { class: "tag join", text: room.invited ? "invited" : "join" }),
      room.unread
        ? h("span", { class: "badge" }, String(room.unread), h("span", { class: "sr-only", text: " unread" }))
        : null,
    ),
  );
}

function renderRoomView() {
  const room = currentRoom();
  $("no-room").hidden = Boolean(room) || Boolean(app.panel);
  $("room-view").hidden = !room || Boolean(app.panel);
  app.liById = new Map();
  const list = $("message-list");
  if (!room) {
    list.replaceChildren();
    return;
  }
  $("room-title").textContent = displayName(room);
  const sub = isDm(room)
    ? "direct message"
    : `#${room.id} · ${room.visibility}${room.member ? "" : " · not a member"}`;
  $("room-sub").textContent = sub;
  $("invite-form").hidden = isDm(room) || room.visibility !== "private" || !room.member;
  $("leave-btn").hidden = isDm(room) || !room.member;
  const items = [];
  for (const id of [...room.order, ...room.pendingIds]) {
    const li = h("li");
    app.liById.set(id, li);
    fillMessage(li, room, room.messages.get(id));
    items.push(li);
  }
  list.replaceChildren(...items);
  $("composer-input").disabled = !room.member;
  $("send-btn").disabled = !room.member;
  renderHistoryStatus();
  renderPresence();
  renderTyping();
  renderSeenBy();
}

// Puts the <li> of msg at its place: confirmed messages by cursor, then pending ones.
function placeMessage(room, msg, index) {
  if (!isCurrent(room)) return;
  let li = app.liById.get(msg.id);
  if (!li) {
    li = h("li");
    app.liById.set(msg.id, li);
  }
  fillMessage(li, room, msg);
  const list = $("message-list");
  let anchor = null;
  if (index === null) anchor = null;
  else {
    const nextId = room.order[index + 1] || room.pendingIds.find((id) => id !== msg.id);
    anchor = nextId ? app.liById.get(nextId) || null : null;
  }
  if (anchor === li) return;
  list.insertBefore(li, anchor);
}

function renderMessage(msg) {
  const room = currentRoom();
  const li = app.liById.get(msg.id);
  if (room && li) fillMessage(li, room, msg);
}

function fillMessage(li, room, msg) {
  const own = msg.author === me();
  const state = msg.local || "confirmed";
  const found = app.found !== null && app.found.room === room.id && app.found.id === msg.id;
  li.className = `msg${own ? " own" : ""}${msg.deleted ? " deleted" : ""}${found ? " found" : ""}`;
  li.dataset.id = msg.id;
  li.dataset.state = state;
  li.dataset.author = msg.author;
  li.tabIndex = 0; // keyboard users focus a message to reach its actions (shown on focus)

  const when = new Date(Number.isFinite(msg.ts) ? msg.ts : Date.now());
  const time = h("time", { datetime: when.toISOString(), title: when.toLocaleString() }, formatTime(when.getTime()));
  const meta = h(
    "div",
    { class: "meta" },
    h("span", { class: "author", text: msg.author }),
    " ",
    time,
    msg.edited && !msg.deleted ? h("span", { class: "edited", text: "(edited)" }) : null,
    state === "pending" ? h("span", { class: "state pending", text: "sending…" }) : null,
    state === "failed" ? h("span", { class: "state failed", text: "not sent" }) : null,
  );

  let body;
  if (msg.deleted) body = h("p", { class: "body deleted-note", text: "message deleted" });
  else if (app.editing === msg.id && own && state === "confirmed") body = editForm(room, msg, li);
  else body = h("p", { class: "body", text: msg.body });

  const parts = [meta, body];
  const reactions = msg.reactions || {};
  const emojis = Object.keys(reactions).filter((e) => (reactions[e] || []).length);
  if (emojis.length && !msg.deleted) {
    parts.push(
      h(
        "div",
        { class: "reactions" },
        ...emojis.map((emoji) => {
          const users = reactions[emoji];
          const mine = users.includes(me());
          return h(
            "button",
            {
              type: "button",
              class: `chip${mine ? " mine" : ""}`,
              "aria-pressed": mine ? "true" : "false",
              title: users.join(", "),
              "aria-label": `${emoji} ${users.length}: ${users.join(", ")}`,
              onclick: () => toggleReaction(room, msg, emoji),
            },
            `${emoji} ${users.length}`,
          );
        }),
      ),
    );
  }
  if (state === "failed") {
    parts.push(
      h(
        "div",
        { class: "failure", role: "alert" },
        h("span", { text: msg.error || "Not sent." }),
        h("button", { type: "button", class: "link-button", onclick: () => retry(msg) }, "Retry"),
        h("button", { type: "button", class: "link-button", onclick: () => discard(room, msg) }, "Discard"),
      ),
    );
  }
  if (state === "confirmed" && !msg.deleted && app.editing !== msg.id) parts.push(messageActions(room, msg, own));
  li.replaceChildren(...parts);
}

function messageActions(room, msg, own) {
  const bar = h("div", { class: "actions", role: "toolbar", "aria-label": `Actions for the message from ${msg.author}` });
  for (const emoji of REACTIONS) {
    bar.append(
      h(
        "button",
        {
          type: "button",
          class: "icon-button react",
          "aria-label": `React with ${emoji}`,
          title: `React with ${emoji}`,
          onclick: () => toggleReaction(room, msg, emoji),
        },
        emoji,
      ),
    );
  }
  if (own) {
    bar.append(h("button", { type: "button", class: "link-button edit", onclick: () => startEditing(msg) }, "Edit"));
    const del = h("button", { type: "button", class: "link-button delete" }, "Delete");
    let armed = null;
    del.addEventListener("click", () => {
      if (armed) {
        clearTimeout(armed);
        armed = null;
        deleteMessage(room, msg);
        return;
      }
      del.textContent = "Really delete?";
      del.classList.add("armed");
      armed = setTimeout(() => {
        armed = null;
        del.textContent = "Delete";
        del.classList.remove("armed");
      }, 4000);
    });
    bar.append(del);
  }
  return bar;
}

function editForm(room, msg, li) {
  const existing = li.querySelector("form.edit-form");
  if (existing) return existing;
  const area = h("textarea", { class: "edit-input", "aria-label": "Edit message", rows: "2" });
  area.value = msg.body;
  const form = h(
    "form",
    { class: "edit-form", novalidate: true },
    area,
    h("div", { class: "row" },
      h("button", { type: "submit", class: "primary" }, "Save"),
      h("button", { type: "button", onclick: () => stopEditing() }, "Cancel"),
    ),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    saveEdit(room, msg, area.value);
  });
  area.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") stopEditing();
    else if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      saveEdit(room, msg, area.value);
    }
  });
  return form;
}

function renderHistoryStatus() {
  const room = currentRoom();
  const status = $("history-status");
  if (!room) return;
  if (room.loadingOlder) status.textContent = "Loading older messages…";
  else if (!room.primed) status.textContent = app.connected ? "Loading…" : "";
  else if (!room.more) {
    status.textContent = room.order.length || room.pendingIds.length ? "This is the start of the room." : "No messages yet. Say hello!";
  }
  else status.textContent = "Scroll up for older messages.";
}

function renderPresence() {
  const room = currentRoom();
  const box = $("presence");
  if (!room) return;
  const users = [...room.online].sort();
  box.replaceChildren(
    ...users.map((u) => h("span", { class: `presence-user${u === me() ? " self" : ""}`, title: `${u} is online` }, h("span", { class: "dot", "aria-hidden": "true" }), u)),
  );
  box.setAttribute("aria-label", users.length ? `Online now: ${users.join(", ")}` : "Nobody else online");
}

function renderTyping() {
  const room = currentRoom();
  const box = $("typing");
  if (!room) return;
  const now = Date.now();
  const users = [];
  for (const [u, until] of room.typing) {
    if (until > now) users.push(u);
    else room.typing.delete(u);
  }
  users.sort();
  if (!users.length) box.textContent = "";
  else if (users.length > 3) box.textContent = "Several people are typing…";
  else box.textContent = `${listNames(users)} ${users.length === 1 ? "is" : "are"} typing…`;
}

function renderSeenBy() {
  const room = currentRoom();
  const box = $("seen-by");
  if (!room) return;
  const lastId = room.order[room.order.length - 1];
  const last = lastId ? room.messages.get(lastId) : null;
  const users = last
    ? [...room.readers].filter(([u, c]) => u !== me() && u !== last.author && c >= last.cursor).map(([u]) => u).sort()
    : [];
  box.textContent = users.length ? `Seen by ${listNames(users)}` : "";
}

function autosize(area) {
  area.style.height = "auto";
  area.style.height = `${Math.min(area.scrollHeight, 200)}px`;
}

// ---------------------------------------------------------------- search and statistics
//
// Both replace the room view while open (`app.panel`); opening a room closes them. Search
// runs the `search` operation; statistics come from GET /v1/stats (docs/VIEWS.md) and are
// drawn as inline SVG built element by element, like the rest of the page.

function showPanel(name) {
  app.panel = name;
  $("search-view").hidden = name !== "search";
  $("stats-view").hidden = name !== "stats";
  $("stats-btn").setAttribute("aria-pressed", name === "stats" ? "true" : "false");
  renderRoomView();
  if (!name) scrollToBottom();
}

function startSearch(ev) {
  ev.preventDefault();
  const query = $("search-input").value.trim();
  if (!query) {
    $("search-input").focus();
    return;
  }
  const room = currentRoom();
  const only = $("search-here").checked && room ? room.id : null;
  app.search = { query, room: only, next: null, count: 0, loading: false };
  $("search-results").replaceChildren();
  renderSearchScope();
  showPanel("search");
  searchPage();
}

function renderSearchScope() {
  const room = currentRoom();
  $("search-here").disabled = !room;
  $("search-here-name").textContent = room ? displayName(room) : "the open room";
}

async function searchPage() {
  const s = app.search;
  if (!s || s.loading) return;
  const status = $("search-status");
  $("search-title").textContent = `Search: “${s.query}”`;
  if (!app.connected) {
    status.textContent = "Not connected; search again when the connection is back.";
    return;
  }
  s.loading = true;
  status.textContent = "Searching…";
  $("search-more").hidden = true;
  const req = { query: s.query, limit: SEARCH_PAGE };
  if (s.room) req.room = s.room;
  if (s.next) req.after = s.next;
  try {
    const res = await app.conn.request("search", req);
    if (app.search !== s) return;
    const results = Array.isArray(res.results) ? res.results.filter((r) => r && typeof r.room === "string" && typeof r.id === "string") : [];
    s.next = typeof res.next === "string" ? res.next : null;
    s.count += results.length;
    $("search-results").append(...results.map(searchItem));
    const where = s.room ? ` in ${displayName(app.rooms.get(s.room) || new Room(s.room))}` : "";
    if (!s.count) status.textContent = `No messages match “${s.query}”${where}.`;
    else status.textContent = `${s.count}${s.next ? "+" : ""} message${s.count === 1 ? "" : "s"} found${where}, best match first.`;
    $("search-more").hidden = !s.next;
  } catch (e) {
    if (app.search !== s) return;
    status.textContent = e.code === "unavailable" ? "Search is not available on this server right now." : describe(e);
  } finally {
    s.loading = false;
  }
}

function searchItem(r) {
  const room = app.rooms.get(r.room) || new Room(r.room);
  const when = new Date(Number.isFinite(r.ts) ? r.ts : 0);
  return h(
    "li",
    {},
    h(
      "button",
      { type: "button", class: "hit", dataset: { room: r.room, id: r.id }, onclick: () => jumpTo(r.room, r.id) },
      h(
        "span",
        { class: "meta" },
        h("span", { class: "hit-room", text: displayName(room) }),
        h("span", { class: "author", text: typeof r.author === "string" ? r.author : "" }),
        h("time", { datetime: when.toISOString(), title: when.toLocaleString() }, formatTime(when.getTime())),
        r.edited ? h("span", { class: "edited", text: "(edited)" }) : null,
      ),
      h("span", { class: "snippet" }, ...snippetNodes(r.snippet, r.highlights)),
    ),
  );
}

// The snippet as text nodes with <mark> elements around the matched ranges. The server counts
// the ranges in characters (code points), not in JavaScript's UTF-16 units.
function snippetNodes(text, ranges) {
  if (typeof text !== "string") return [];
  const chars = Array.from(text);
  const valid = (Array.isArray(ranges) ? ranges : []).filter(
    (r) => Array.isArray(r) && Number.isInteger(r[0]) && Number.isInteger(r[1]),
  );
  valid.sort((a, b) => a[0] - b[0]);
  const out = [];
  let at = 0;
  for (const [from, to] of valid) {
    const start = Math.max(at, Math.min(from, chars.length));
    const end = Math.min(to, chars.length);
    if (end <= start) continue;
    if (start > at) out.push(chars.slice(at, start).join(""));
    out.push(h("mark", { text: chars.slice(start, end).join("") }));
    at = end;
  }
  if (at < chars.length) out.push(chars.slice(at).join(""));
  return out;
}

// Opens the room of a search result and reads its history back, page by page, until the
// message is loaded (the room's messages stay one unbroken stretch up to the newest), then
// scrolls to it and highlights it.
async function jumpTo(roomId, id) {
  const target = { room: roomId, id };
  app.found = target;
  if (!app.rooms.has(roomId)) upsertRoom(roomId);
  await openRoom(roomId);
  const room = app.rooms.get(roomId);
  if (!room || app.found !== target) return;
  let pages = 0;
  for (let waits = 0; waits < 300 && !room.messages.has(id); ) {
    if (!isCurrent(room) || app.found !== target) return;
    if (room.primed && !room.more) break;
    if (!app.connected || !room.primed || room.loadingOlder) {
      waits += 1;
      await sleep(100);
      continue;
    }
    if (pages >= JUMP_PAGES || !(await loadOlder(room, JUMP_PAGE))) break;
    pages += 1;
  }
  if (!isCurrent(room) || app.found !== target) return;
  if (!room.messages.has(id)) {
    showInfo("That message could not be loaded: it may have been deleted, or it is too far back.");
    return;
  }
  // some context above it too
  if (room.order.indexOf(id) < 10 && room.more) await loadOlder(room);
  if (!isCurrent(room) || app.found !== target) return;
  const li = app.liById.get(id);
  if (!li) return;
  renderMessage(room.messages.get(id));
  li.scrollIntoView({ block: "center" });
  li.focus({ preventScroll: true });
}

function readableRooms() {
  return [...app.rooms.values()]
    .filter((r) => r.member || (!isDm(r) && r.visibility === "public"))
    .sort((a, b) => Number(b.member) - Number(a.member) || displayName(a).localeCompare(displayName(b)));
}

function openStats() {
  const select = $("stats-room");
  const rooms = readableRooms();
  const wanted = select.value || app.current;
  select.replaceChildren(...rooms.map((r) => h("option", { value: r.id }, displayName(r))));
  if (rooms.some((r) => r.id === wanted)) select.value = wanted;
  showPanel("stats");
  loadStats();
}

function statsPath(room, days, top) {
  return `v1/stats?room=${encodeURIComponent(room)}&days=${days}&top=${top}`;
}

// Loads the selected room's statistics, then every readable room's message count (at most
// STATS_ROOMS of them, one request each) for "most active rooms".
async function loadStats() {
  const seq = ++app.statsSeq;
  const roomId = $("stats-room").value;
  const token = app.session ? app.session.token : null;
  const lag = $("stats-lag");
  const charts = ["chart-days", "chart-users", "chart-rooms"];
  if (!roomId) {
    lag.textContent = "Join a room to see its statistics.";
    for (const id of charts) $(id).replaceChildren();
    return;
  }
  const room = app.rooms.get(roomId) || new Room(roomId);
  lag.textContent = "Loading…";
  $("chart-days-title").textContent = `Messages per day in ${displayName(room)}, last ${STATS_DAYS} days (UTC)`;
  $("chart-users-title").textContent = `Most active people in ${displayName(room)}`;
  let one;
  try {
    one = await api("GET", statsPath(roomId, STATS_DAYS, STATS_TOP), undefined, token);
  } catch (e) {
    if (seq !== app.statsSeq) return;
    if (e.code === "http_404") lag.textContent = "Statistics are not enabled on this server.";
    else if (e.code === "unavailable") lag.textContent = "Statistics are not available right now; try Refresh in a moment.";
    else lag.textContent = describe(e);
    for (const id of charts) $(id).replaceChildren();
    return;
  }
  if (seq !== app.statsSeq) return;
  renderLag(one.lag);
  const days = dayRange(one.since, STATS_DAYS);
  const perDay = new Map((Array.isArray(one.days) ? one.days : []).map((d) => [d.day, d]));
  $("chart-days").replaceChildren(
    columnChart(
      days.map((day) => ({
        label: day,
        short: day.slice(5),
        value: perDay.has(day) ? Number(perDay.get(day).messages) || 0 : 0,
        note: perDay.has(day) ? `, ${perDay.get(day).users} active` : "",
      })),
      `Messages per day in ${displayName(room)}`,
    ),
  );
  const users = (Array.isArray(one.top_users) ? one.top_users : []).map((u) => ({ label: String(u.user), value: Number(u.messages) || 0 }));
  $("chart-users").replaceChildren(barChart(users, `Most active people in ${displayName(room)}`, "No messages yet."));

  const rooms = readableRooms().slice(0, STATS_ROOMS);
  const counts = [];
  let unread = 0; // rooms whose count could not be read (other than left or not readable)
  $("chart-rooms").replaceChildren(h("p", { class: "muted", text: "Loading…" }));
  for (const r of rooms) {
    let n = null;
    if (r.id === roomId) n = Number(one.messages) || 0;
    else {
      try {
        const res = await api("GET", statsPath(r.id, 1, 1), undefined, token);
        n = Number(res.messages) || 0;
      } catch (e) {
        n = null; // left since, or not readable: leave it out
        if (e.code !== "not_found" && e.code !== "forbidden") unread += 1;
      }
    }
    if (seq !== app.statsSeq) return;
    if (n) counts.push({ label: displayName(r), value: n });
  }
  counts.sort((a, b) => b.value - a.value || a.label.localeCompare(b.label));
  const parts = [barChart(counts.slice(0, STATS_TOP), "Most active rooms", "No messages in your rooms yet.")];
  if (unread) parts.push(h("p", { class: "muted", text: `${unread} room${unread === 1 ? "" : "s"} could not be read; try Refresh.` }));
  $("chart-rooms").replaceChildren(...parts);
}

function renderLag(lag) {
  const box = $("stats-lag");
  if (!lag || typeof lag !== "object") {
    box.textContent = "";
    return;
  }
  const records = Number(lag.records) || 0;
  const updated = Number.isFinite(lag.updated_ms) ? ` Last indexed ${formatTime(lag.updated_ms)}.` : "";
  box.dataset.behind = String(records);
  box.textContent = records
    ? `Indexer catching up: ${records} record${records === 1 ? "" : "s"} behind (${Number(lag.seconds) || 0} s).${updated}`
    : `Indexer up to date: ${Number(lag.applied) || 0} records applied.${updated}`;
}

// The `count` UTC days (YYYY-MM-DD) from `since` on.
function dayRange(since, count) {
  const start = typeof since === "string" ? Date.parse(`${since}T00:00:00Z`) : NaN;
  const first = Number.isFinite(start) ? start : Date.now() - (count - 1) * 86400000;
  const days = [];
  for (let i = 0; i < count; i += 1) days.push(new Date(first + i * 86400000).toISOString().slice(0, 10));
  return days;
}

function clip(text, n) {
  const chars = Array.from(text);
  return chars.length > n ? `${chars.slice(0, n - 1).join("")}…` : text;
}

// A column per item ({label, short, value, note}), value above the nonzero ones, a tick label
// under every few.
function columnChart(items, caption) {
  const W = 720;
  const H = 220;
  const left = 8;
  const top = 20;
  const bottom = 26;
  const plot = H - top - bottom;
  const max = Math.max(1, ...items.map((i) => i.value));
  const step = (W - 2 * left) / Math.max(1, items.length);
  const width = Math.max(2, step * 0.72);
  const every = Math.max(1, Math.ceil(items.length / 10));
  const chart = svg("svg", { class: "chart-svg", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": caption }, svg("title", {}, caption));
  chart.append(svg("line", { class: "axis", x1: left, x2: W - left, y1: top + plot + 0.5, y2: top + plot + 0.5 }));
  items.forEach((item, i) => {
    const hgt = Math.round((item.value / max) * plot);
    const x = left + i * step + (step - width) / 2;
    const y = top + plot - hgt;
    const g = svg("g", { class: "column" });
    g.append(
      svg(
        "rect",
        { class: "bar", x: x.toFixed(1), y, width: width.toFixed(1), height: hgt, "data-label": item.label, "data-value": item.value },
        svg("title", {}, `${item.label}: ${item.value} message${item.value === 1 ? "" : "s"}${item.note || ""}`),
      ),
    );
    if (item.value) g.append(svg("text", { class: "value", x: (x + width / 2).toFixed(1), y: y - 5, "text-anchor": "middle" }, String(item.value)));
    if (i % every === 0 || i === items.length - 1) {
      g.append(svg("text", { class: "tick", x: (x + width / 2).toFixed(1), y: H - 8, "text-anchor": "middle" }, item.short || item.label));
    }
    chart.append(g);
  });
  return chart;
}

// A horizontal bar per item ({label, value}), largest first as given.
function barChart(items, caption, empty) {
  if (!items.length) return h("p", { class: "muted", text: empty });
  const W = 720;
  const row = 28;
  const labelW = 190;
  const H = items.length * row + 6;
  const max = Math.max(1, ...items.map((i) => i.value));
  const room = W - labelW - 70;
  const chart = svg("svg", { class: "chart-svg", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": caption }, svg("title", {}, caption));
  items.forEach((item, i) => {
    const y = i * row + 4;
    const width = Math.max(2, Math.round((item.value / max) * room));
    chart.append(
      svg(
        "g",
        { class: "row" },
        svg("text", { class: "label", x: labelW - 10, y: y + 15, "text-anchor": "end" }, clip(item.label, 26)),
        svg(
          "rect",
          { class: "bar", x: labelW, y, width, height: 20, rx: 3, "data-label": item.label, "data-value": item.value },
          svg("title", {}, `${item.label}: ${item.value} message${item.value === 1 ? "" : "s"}`),
        ),
        svg("text", { class: "value", x: labelW + width + 8, y: y + 15 }, String(item.value)),
      ),
    );
  });
  return chart;
}

// ---------------------------------------------------------------- wiring

function onComposerInput() {
  const area = $("composer-input");
  autosize(area);
  const room = currentRoom();
  const now = Date.now();
  if (room && area.value.trim() && app.connected && now - app.lastTypingSent > TYPING_SEND_EVERY_MS) {
    app.lastTypingSent = now;
    // The cluster passes on at most one typing event a second per user and room (PROTOCOL.md):
    // one right after the previous (a new message started just after sending one) waits.
    const wait = Math.max(0, app.lastTypingFrame + TYPING_MIN_GAP_MS - now);
    clearTimeout(app.typingTimer);
    app.typingTimer = setTimeout(() => {
      if (!app.connected || currentRoom() !== room || !$("composer-input").value.trim()) return;
      app.lastTypingFrame = Date.now();
      app.conn.request("typing", { room: room.id }).catch(() => {});
    }, wait);
  }
}

function init() {
  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    authenticate("login");
  });
  $("signup-btn").addEventListener("click", () => authenticate("signup"));
  $("logout-btn").addEventListener("click", logout);
  $("reconnect-btn").addEventListener("click", retryNow);
  $("banner-close").addEventListener("click", () => {
    $("banner").hidden = true;
  });
  $("create-form").addEventListener("submit", createRoom);
  $("join-form").addEventListener("submit", joinRoom);
  $("dm-form").addEventListener("submit", openDm);
  $("invite-form").addEventListener("submit", inviteUser);
  $("leave-btn").addEventListener("click", leaveRoom);
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sendFromComposer();
  });
  const area = $("composer-input");
  area.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      sendFromComposer();
    }
  });
  area.addEventListener("input", onComposerInput);
  $("search-form").addEventListener("submit", startSearch);
  $("search-more").addEventListener("click", searchPage);
  $("search-close").addEventListener("click", () => showPanel(null));
  $("stats-btn").addEventListener("click", () => (app.panel === "stats" ? showPanel(null) : openStats()));
  $("stats-close").addEventListener("click", () => showPanel(null));
  $("stats-refresh").addEventListener("click", loadStats);
  $("stats-room").addEventListener("change", loadStats);
  $("search-input").addEventListener("focus", renderSearchScope);
  $("search-here").addEventListener("change", () => {
    if (app.search && $("search-input").value.trim()) startSearch(new Event("submit"));
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && app.panel && !ev.defaultPrevented) showPanel(null);
  });
  $("messages").addEventListener("scroll", onScroll, { passive: true });
  document.addEventListener("visibilitychange", scheduleRead);
  window.addEventListener("focus", scheduleRead);
  window.addEventListener("online", () => {
    if (app.session && !app.connected) retryNow();
  });
  setInterval(() => {
    const room = currentRoom();
    if (room && room.typing.size) renderTyping();
  }, 1000);

  app.session = loadSession();
  if (app.session) startMain();
  else showAuth("");
}

init();
