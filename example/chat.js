/*
 * pgws chat example (plain browser JavaScript, no dependencies).
 *
 * DEMO ONLY: when the token field is empty this page signs an HS256 JWT
 * itself, with the secret typed into the page. Never do that in a real
 * application: the secret would be visible to every visitor, who could then
 * mint tokens for any channel. A real app gets its tokens from its backend
 * (or, for testing, from `pgws token`).
 *
 * Received data is untrusted: it is only ever put into the page with
 * textContent, never innerHTML.
 */
"use strict";

const DEMO_SECRET =
  "auwhfdnskjhewfi34uwehdlaehsfkuaeiskjnfduierhfsiweskjcnzeiluwhskdewishdnpwe";

/* Keep the lists from growing without bound in a long-running tab. */
const MAX_ITEMS = 500;

/* What each close code means, in plain words for the status line. */
const CLOSE_REASONS = {
  1000: "normal closure",
  1001: "server going away (restart or shutdown)",
  1006: "connection lost (no close frame: the server may be down or refused " +
        "the token; the browser cannot see HTTP 401/403 reasons)",
  1008: "policy violation (e.g. slow consumer)",
  1009: "message too big",
  3001: "token expired",
};

/* ---------- JWT signing (HS256 with WebCrypto) ---------- */

/* base64url without padding, from bytes (RFC 7515 §2). */
function base64url(bytes) {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/* JSON -> UTF-8 bytes -> base64url, so non-ASCII channel names survive. */
function base64urlJson(value) {
  return base64url(new TextEncoder().encode(JSON.stringify(value)));
}

/* Sign `claims` as a compact HS256 JWT with the UTF-8 bytes of `secret`. */
async function signHS256(claims, secret) {
  const subtle = globalThis.crypto && globalThis.crypto.subtle;
  if (!subtle) {
    // crypto.subtle only exists in secure contexts (https or localhost).
    throw new Error("WebCrypto is unavailable here (the page must be served " +
                    "over https or from localhost); paste a token instead");
  }
  const enc = new TextEncoder();
  const signingInput =
    base64urlJson({ alg: "HS256", typ: "JWT" }) + "." + base64urlJson(claims);
  const key = await subtle.importKey(
    "raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const signature = await subtle.sign("HMAC", key, enc.encode(signingInput));
  return signingInput + "." + base64url(new Uint8Array(signature));
}

/* Claims of a demo token for exactly one channel. The chat socket and the
   meta-channel socket each get their own: the server turns every frame a
   socket sends into one NOTIFY per channel its token grants, so one token
   for both channels would copy every chat message onto the meta channel. */
function demoClaims(mode, channel, nowSeconds) {
  return { mode: mode, channels: [channel], exp: Math.floor(nowSeconds) + 3600 };
}

/* ---------- URLs and close codes ---------- */

/* ws:// for http pages, wss:// for https, same host:port. Opened from a
   file:// URL there is no host, so fall back to the default pgws port. */
function defaultServerUrl(loc) {
  if (loc.protocol !== "http:" && loc.protocol !== "https:") return "ws://localhost:3000";
  return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host;
}

/* Both URL forms of the server: /<token> (all channels of the token) or
   /<channel>/<token> (just that one). */
function socketUrl(server, token, channel, channelInUrl) {
  const base = server.trim().replace(/\/+$/, "");
  if (channelInUrl) return base + "/" + encodeURIComponent(channel) + "/" + token;
  return base + "/" + token;
}

function describeClose(code, reason) {
  const meaning = CLOSE_REASONS[code] || "closed by the server or the network";
  let text = "closed: " + code + " " + meaning;
  if (reason) text += " (reason: " + reason + ")";
  return text;
}

/* ---------- the page ---------- */

const $ = (id) => document.getElementById(id);

/* Two sockets: `socket` for the chat channel (mode as chosen) and, when a
   meta channel is given, `metaSocket`, read-only, for server events. Nothing
   is ever sent on the meta socket. */
let socket = null;        // the chat WebSocket, if any
let metaSocket = null;    // the read-only meta-channel WebSocket, if any
let activeMeta = "";      // meta channel name used for the current sockets
let attempt = 0;          // bumped by every Connect, so a stale one gives up

/* Status line (about the chat socket). data-state lets CSS (and tests) see
   the state without parsing words. Note: no state text but "connected"
   contains the word "connected" ("idle", "connecting…", "closed: …"), so a
   test can look for it. */
function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

/* Add a short note to the current status without losing it (e.g. the
   close code stays visible). */
function noteStatus(note) {
  const el = $("status");
  el.textContent = el.textContent.replace(/ — .*$/, "") + " — " + note;
}

function setConnectedUi(connected) {
  $("disconnect").disabled = !connected;
}

/* Append an <li> built from [className, text] parts; trim old entries. */
function appendItem(list, parts) {
  const li = document.createElement("li");
  for (const [cls, text] of parts) {
    if (text === undefined || text === null || text === "") continue;
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = String(text);
    li.appendChild(span);
  }
  list.appendChild(li);
  while (list.children.length > MAX_ITEMS) list.removeChild(list.firstChild);
  list.scrollTop = list.scrollHeight;
}

/* message_delivered_at is UNIX seconds (float); show it as local time. */
function formatTime(claims) {
  const t = claims && Number(claims.message_delivered_at);
  if (!Number.isFinite(t)) return "";
  return new Date(t * 1000).toLocaleTimeString();
}

/* Parse a frame; return the object only if it looks like a pgws envelope. */
function parseEnvelope(text) {
  try {
    const value = JSON.parse(text);
    if (value && typeof value === "object" && !Array.isArray(value)) return value;
  } catch (_) { /* not JSON: shown raw */ }
  return null;
}

/* Server events (ConnectionOpen, ConnectionClose) and anything on the meta
   channel go to #meta. An envelope without "event" (a hand-made pg_notify)
   is treated as chat. */
function isMetaEvent(msg) {
  if (activeMeta !== "" && msg.channel === activeMeta) return true;
  return typeof msg.event === "string" && msg.event !== "WebsocketMessage";
}

/* Show one received frame; everything from the meta socket goes to #meta. */
function showFrame(text, fromMeta) {
  const msg = parseEnvelope(text);
  if (!msg) {
    appendItem($(fromMeta ? "meta" : "messages"), [["raw", text]]);
  } else if (fromMeta || isMetaEvent(msg)) {
    const mode = msg.claims && msg.claims.mode ? "mode " + msg.claims.mode : "";
    appendItem($("meta"), [
      ["time", formatTime(msg.claims)],
      ["event", msg.event || "(no event)"],
      ["payload", msg.payload],
      ["note", mode],
    ]);
  } else if (typeof msg.payload === "string") {
    appendItem($("messages"), [
      ["time", formatTime(msg.claims)],
      ["channel", msg.channel],
      ["payload", msg.payload],
    ]);
  } else {
    // JSON, but not the usual envelope (a custom producer): show it as sent.
    appendItem($("messages"), [["raw", text]]);
  }
}

/* The tokens for the two sockets: a pasted token serves both (the meta
   socket then names its channel in the URL, so that is all it is granted),
   else one demo token per socket: the chosen mode for chat, "r" for meta. */
async function obtainTokens(channel, mode, metaChannel) {
  const given = $("token").value.trim();
  const box = $("made-token-box");
  if (given) {
    box.hidden = true;
    return { chat: given, meta: given, pasted: true };
  }
  const now = Date.now() / 1000;
  const secret = $("secret").value;
  const chat = await signHS256(demoClaims(mode, channel, now), secret);
  const meta = metaChannel ? await signHS256(demoClaims("r", metaChannel, now), secret) : "";
  $("made-token").textContent = chat;
  box.hidden = false;
  return { chat: chat, meta: meta, pasted: false };
}

/* Forget a socket and close it. Handlers are detached first so a late close
   event of an old socket does not overwrite the state of a new one. */
function discard(ws, code, reason) {
  if (!ws) return;
  ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  ws.close(code, reason);
}

function closeSockets(code, reason) {
  const chat = socket;
  const meta = metaSocket;
  socket = metaSocket = null;
  discard(chat, code, reason);
  discard(meta, code, reason);
}

async function connect(event) {
  event.preventDefault();
  closeSockets(1000, "reconnecting");
  const run = ++attempt;

  const channel = $("channel").value.trim();
  const mode = $("mode").value;
  let metaChannel = $("meta-channel").value.trim();
  if (!channel) {
    setStatus("error", "error: a channel name is needed");
    return;
  }
  // Meta channel = chat channel: the chat socket already reads it.
  if (metaChannel === channel) metaChannel = "";

  const server = $("url").value;
  const channelInUrl = $("channel-in-url").checked;
  let chatUrl;
  let metaUrl = "";
  try {
    const tokens = await obtainTokens(channel, mode, metaChannel);
    if (run !== attempt) return; // Connect was clicked again meanwhile
    chatUrl = socketUrl(server, tokens.chat, channel, channelInUrl);
    if (metaChannel) {
      metaUrl = socketUrl(server, tokens.meta, metaChannel, channelInUrl || tokens.pasted);
    }
  } catch (err) {
    setStatus("error", "error: " + err.message);
    return;
  }
  activeMeta = metaChannel;
  setStatus("connecting", "connecting…");
  setConnectedUi(true); // Disconnect also cancels a connection attempt

  const openChat = () => {
    if (run !== attempt || socket) return;
    try {
      socket = new WebSocket(chatUrl); // throws on a malformed URL
    } catch (err) {
      closeSockets(1000, "bye");
      setStatus("error", "error: " + err.message);
      setConnectedUi(false);
      return;
    }
    attachChatHandlers(socket);
  };

  if (!metaUrl) {
    openChat();
    return;
  }
  // The meta socket first, so it also sees the chat socket's ConnectionOpen;
  // the chat socket follows once it is open (or has failed).
  try {
    metaSocket = new WebSocket(metaUrl);
  } catch (err) {
    setStatus("error", "error: " + err.message);
    setConnectedUi(false);
    return;
  }
  attachMetaHandlers(metaSocket, openChat);
}

function attachChatHandlers(ws) {
  ws.onopen = () => {
    setStatus("open", "connected");
    setConnectedUi(true);
  };
  ws.onmessage = (e) => {
    // pgws only sends text frames; a Blob would be a server bug, show a note.
    showFrame(typeof e.data === "string" ? e.data : "[binary frame]", false);
  };
  // onerror carries no detail in browsers; onclose (which always follows)
  // has the code, so the status is set there.
  ws.onerror = () => {};
  ws.onclose = (e) => {
    if (socket !== ws) return;
    // The meta socket belongs to this connection: it goes with it.
    closeSockets(1000, "bye");
    setStatus("closed", describeClose(e.code, e.reason));
    setConnectedUi(false);
  };
}

function attachMetaHandlers(ws, next) {
  ws.onopen = next;
  ws.onmessage = (e) => {
    showFrame(typeof e.data === "string" ? e.data : "[binary frame]", true);
  };
  ws.onerror = () => {};
  ws.onclose = (e) => {
    if (metaSocket !== ws) return;
    metaSocket = null;
    appendItem($("meta"), [
      ["event", "meta channel socket"],
      ["payload", describeClose(e.code, e.reason)],
    ]);
    next(); // chat goes on without server events
  };
}

function disconnect() {
  if (!socket) {
    // Still opening the meta socket: give up the whole attempt.
    attempt++;
    closeSockets(1000, "bye");
    setStatus("idle", "idle");
    setConnectedUi(false);
    return;
  }
  // Status first: onclose (kept attached on the chat socket, so the status
  // then shows the real close code) replaces it once the server answers.
  setStatus("closing", "closing…");
  discard(metaSocket, 1000, "bye");
  metaSocket = null;
  socket.close(1000, "bye");
}

function send(event) {
  event.preventDefault();
  const input = $("message");
  const text = input.value;
  if (text === "") return;
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    noteStatus("cannot send, the socket is not open");
    return; // keep the text so it can be sent after connecting
  }
  socket.send(text); // one text frame; the server wraps it in the envelope
  input.value = "";
}

function init() {
  $("url").value = defaultServerUrl(location);
  if (!$("secret").value) $("secret").value = DEMO_SECRET;
  $("connect-form").addEventListener("submit", connect);
  $("send-form").addEventListener("submit", send);
  $("disconnect").addEventListener("click", disconnect);
}

if (typeof document !== "undefined") {
  document.addEventListener("DOMContentLoaded", init);
}

/* Lets node load the pure functions for a quick test; ignored by browsers. */
if (typeof module === "object" && module.exports) {
  module.exports = { base64url, signHS256, demoClaims, defaultServerUrl,
                     socketUrl, describeClose, parseEnvelope };
}
