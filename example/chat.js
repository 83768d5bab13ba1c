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

/* Claims the demo token carries: the chat channel plus the meta channel, if any. */
function demoClaims(mode, channel, metaChannel, nowSeconds) {
  const channels = [channel];
  if (metaChannel && metaChannel !== channel) channels.push(metaChannel);
  return { mode: mode, channels: channels, exp: Math.floor(nowSeconds) + 3600 };
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

let socket = null;        // the current WebSocket, if any
let activeMeta = "";      // meta channel name used for the current socket

/* Status line. data-state lets CSS (and tests) see the state without parsing
   words. Note: no state text but "connected" contains the word "connected"
   ("idle", "connecting…", "closed: …"), so a test can look for it. */
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

function showFrame(text) {
  const msg = parseEnvelope(text);
  if (!msg) {
    appendItem($("messages"), [["raw", text]]);
  } else if (isMetaEvent(msg)) {
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

/* Use the pasted token, or sign a demo one and show it. */
async function obtainToken(channel, mode, metaChannel) {
  const given = $("token").value.trim();
  const box = $("made-token-box");
  if (given) {
    box.hidden = true;
    return given;
  }
  const claims = demoClaims(mode, channel, metaChannel, Date.now() / 1000);
  const token = await signHS256(claims, $("secret").value);
  $("made-token").textContent = token;
  box.hidden = false;
  return token;
}

function closeSocket(code, reason) {
  if (!socket) return;
  const old = socket;
  socket = null;
  // Detach handlers so a late close event of the old socket does not
  // overwrite the status of a new one.
  old.onopen = old.onmessage = old.onerror = old.onclose = null;
  old.close(code, reason);
}

async function connect(event) {
  event.preventDefault();
  closeSocket(1000, "reconnecting");

  const channel = $("channel").value.trim();
  const mode = $("mode").value;
  const metaChannel = $("meta-channel").value.trim();
  if (!channel) {
    setStatus("error", "error: a channel name is needed");
    return;
  }

  let url;
  try {
    const token = await obtainToken(channel, mode, metaChannel);
    url = socketUrl($("url").value, token, channel, $("channel-in-url").checked);
    setStatus("connecting", "connecting…");
    socket = new WebSocket(url); // throws on a malformed URL
  } catch (err) {
    setStatus("error", "error: " + err.message);
    return;
  }
  activeMeta = metaChannel;
  attachHandlers(socket);
}

function attachHandlers(ws) {
  ws.onopen = () => {
    setStatus("open", "connected");
    setConnectedUi(true);
  };
  ws.onmessage = (e) => {
    // pgws only sends text frames; a Blob would be a server bug, show a note.
    showFrame(typeof e.data === "string" ? e.data : "[binary frame]");
  };
  // onerror carries no detail in browsers; onclose (which always follows)
  // has the code, so the status is set there.
  ws.onerror = () => {};
  ws.onclose = (e) => {
    if (socket === ws) socket = null;
    setStatus("closed", describeClose(e.code, e.reason));
    setConnectedUi(false);
  };
}

function disconnect() {
  if (!socket) return;
  // Status first: onclose (kept attached, so the status then shows the real
  // close code) replaces it once the server answers.
  setStatus("closing", "closing…");
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
