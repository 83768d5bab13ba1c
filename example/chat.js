/*
 * pgws chat example, on the browser client pgws serves at /pgws-client.js
 * (plain browser JavaScript, no dependencies, no build step).
 *
 * The page connects by itself when it loads, reconnects by itself (with
 * back-off) after a network loss or a restart of pgws, renews its token on
 * the open connection before it expires, and says in plain words when
 * messages may have been missed (a gap).
 *
 * DEMO ONLY: when the token field is empty this page signs an HS256 JWT
 * itself, with the secret typed into the page. Never do that in a real
 * application: the secret would be visible to every visitor, who could then
 * mint tokens for any channel. A real app gets its tokens from its backend
 * (or, for testing, from `pgws token`): that is what the `token` callback of
 * PgwsClient is for.
 *
 * Received data is untrusted: it is only ever put into the page with
 * textContent, never innerHTML.
 */
import { PgwsClient, describeClose } from "/pgws-client.js";

export const DEMO_SECRET =
  "auwhfdnskjhewfi34uwehdlaehsfkuaeiskjnfduierhfsiweskjcnzeiluwhskdewishdnpwe";

/* Keep the lists from growing without bound in a long-running tab. */
const MAX_ITEMS = 500;

/* ---------- JWT signing (HS256 with WebCrypto) ---------- */

/* base64url without padding, from bytes (RFC 7515 §2). */
export function base64url(bytes) {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/* JSON -> UTF-8 bytes -> base64url, so non-ASCII channel names survive. */
function base64urlJson(value) {
  return base64url(new TextEncoder().encode(JSON.stringify(value)));
}

/* Sign `claims` as a compact HS256 JWT with the UTF-8 bytes of `secret`. */
export async function signHS256(claims, secret) {
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

/* Claims of a demo token for the chat channel and, if any, the meta channel.
   One protocol-v2 socket reads both and publishes to the chat channel only. */
export function demoClaims(mode, channels, nowSeconds, ttlSeconds) {
  return { mode: mode, channels: channels, exp: Math.floor(nowSeconds) + ttlSeconds };
}

/* ws:// for http pages, wss:// for https, same host:port. Opened from a
   file:// URL there is no host, so fall back to the default pgws port. */
export function defaultServerUrl(loc) {
  if (loc.protocol !== "http:" && loc.protocol !== "https:") return "ws://localhost:3000";
  return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host;
}

/* Parse a frame's data; return it only if it looks like a pgws envelope. */
export function asEnvelope(data) {
  if (data && typeof data === "object" && !Array.isArray(data)) return data;
  return null;
}

/* What a gap means, for people. */
export function describeGap(channel, why, detail) {
  switch (why) {
    case "not recovered":
      return `${channel}: the messages sent while this page was away could not be replayed` +
             (detail ? ` (${detail})` : "") + "; some may be missing above";
    case "server":
      return `${channel}: the server lost its link to the database for a moment; ` +
             "messages sent meanwhile may be missing above";
    case "dropped":
      return `${channel}: the renewed token no longer grants this channel`;
    default:
      return `${channel}: the connection was interrupted and this channel keeps no history; ` +
             "messages sent meanwhile may be missing above";
  }
}

/* ---------- the page ---------- */

const $ = (id) => document.getElementById(id);

let client = null;   // the PgwsClient, while connected or reconnecting
let active = null;   // {channel, meta, mode} of the current client

/* Status line. data-state lets CSS (and tests) see the state without parsing
   words. No state text but "connected" contains the word "connected"
   ("connecting…", "reconnecting…", "closed: …"), so a test can look for it. */
function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

/* Add a short note to the current status without losing it. */
function noteStatus(note) {
  const el = $("status");
  el.textContent = el.textContent.replace(/ — .*$/, "") + " — " + note;
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

function clock(date) {
  return date.toLocaleTimeString();
}

/* message_delivered_at is UNIX seconds (float); show it as local time. */
function formatTime(claims) {
  const t = claims && Number(claims.message_delivered_at);
  if (!Number.isFinite(t)) return "";
  return clock(new Date(t * 1000));
}

/* A line in the events list about the connection itself. */
function connectionEvent(event, text) {
  appendItem($("meta"), [["time", clock(new Date())], ["event", event], ["payload", text]]);
}

/* A message on the chat channel. */
function showChat(channel, data) {
  const msg = asEnvelope(data);
  if (msg && typeof msg.payload === "string") {
    appendItem($("messages"), [
      ["time", formatTime(msg.claims)],
      ["channel", msg.channel || channel],
      ["payload", msg.payload],
    ]);
  } else {
    // Not the usual envelope (a custom producer): show it as sent.
    appendItem($("messages"), [["raw", typeof data === "string" ? data : JSON.stringify(data)]]);
  }
}

/* A message on the meta channel: ConnectionOpen / ConnectionClose of the
   server (sent for legacy sockets), or anything a producer sends there. */
function showMeta(data) {
  const msg = asEnvelope(data);
  if (!msg) {
    appendItem($("meta"), [["raw", typeof data === "string" ? data : JSON.stringify(data)]]);
    return;
  }
  const mode = msg.claims && msg.claims.mode ? "mode " + msg.claims.mode : "";
  appendItem($("meta"), [
    ["time", formatTime(msg.claims)],
    ["event", msg.event || "(no event)"],
    ["payload", msg.payload],
    ["note", mode],
  ]);
}

/* The token callback: a pasted token as is, else a fresh demo token. */
function tokenSource(settings) {
  return async () => {
    if (settings.pasted) return settings.pasted;
    const channels = settings.meta ? [settings.channel, settings.meta] : [settings.channel];
    const claims = demoClaims(settings.mode, channels, Date.now() / 1000, settings.ttl);
    const token = await signHS256(claims, settings.secret);
    $("made-token").textContent = token;
    $("made-token-box").hidden = false;
    return token;
  };
}

function readSettings() {
  const channel = $("channel").value.trim();
  let meta = $("meta-channel").value.trim();
  if (meta === channel) meta = ""; // the chat subscription already reads it
  const ttl = Number.parseInt($("ttl").value, 10);
  return {
    url: $("url").value,
    channel: channel,
    meta: meta,
    mode: $("mode").value,
    secret: $("secret").value,
    pasted: $("token").value.trim(),
    ttl: Number.isFinite(ttl) && ttl > 0 ? ttl : 3600,
  };
}

function onState(state, info) {
  if (state === "connecting") {
    setStatus("connecting", "connecting…");
  } else if (state === "open") {
    setStatus("open", "connected");
    $("disconnect").disabled = false;
    connectionEvent("connected", info.protocol === "legacy"
      ? "this server does not speak protocol v2: legacy protocol, no resume"
      : "protocol v2");
  } else if (state === "reconnecting") {
    const seconds = (info.delay / 1000).toFixed(1);
    const why = describeClose(info.code, info.reason);
    setStatus("reconnecting", `reconnecting in ${seconds} s (attempt ${info.attempt}) after ${why}`);
    if (info.attempt === 1) connectionEvent("connection lost", why + "; reconnecting by itself");
  } else if (state === "closed") {
    setStatus("closed", "closed: " + describeClose(info.code, info.reason));
    $("disconnect").disabled = true;
  }
}

function connect(event) {
  if (event) event.preventDefault();
  disconnect();
  const settings = readSettings();
  if (!settings.channel) {
    setStatus("error", "error: a channel name is needed");
    return;
  }
  active = settings;
  $("disconnect").disabled = false; // Disconnect also stops a connection attempt
  if (settings.pasted) $("made-token-box").hidden = true;
  let created;
  try {
    created = new PgwsClient(settings.url, {
      token: tokenSource(settings),
      onState: onState,
      onGap: (channel, why, detail) => connectionEvent("gap", describeGap(channel, why, detail)),
      onSubscribed: (channel, info) => {
        // A durable channel resumed from where the page was: nothing missed, say so.
        if (info.resumed && info.recovered) {
          connectionEvent("caught up", `${channel}: reconnected and replayed what was missed`);
        }
      },
      onRefresh: (info) => {
        const until = info.exp ? clock(new Date(info.exp * 1000)) : "no expiry";
        connectionEvent("token refreshed", `renewed on the open connection, valid until ${until}`);
      },
      onError: (error) => connectionEvent("problem", error.message),
    });
  } catch (error) {
    setStatus("error", "error: " + error.message);
    return;
  }
  client = created;
  if (settings.mode.includes("r")) {
    client.subscribe(settings.channel, (data) => showChat(settings.channel, data));
    if (settings.meta) client.subscribe(settings.meta, showMeta);
  }
}

function disconnect() {
  if (!client) return;
  const old = client;
  client = null;
  old.close(); // reports "closed: 1000 normal closure (reason: bye)"
}

async function send(event) {
  event.preventDefault();
  const input = $("message");
  const text = input.value;
  if (text === "") return;
  if (!client || !active) {
    noteStatus("cannot send, not connected");
    return;
  }
  try {
    await client.publish(active.channel, text); // the server wraps it in the envelope
    if (input.value === text) input.value = "";
  } catch (error) {
    noteStatus("not sent: " + error.reason); // the text stays, to send again
  }
}

function init() {
  $("url").value = defaultServerUrl(location);
  if (!$("secret").value) $("secret").value = DEMO_SECRET;
  // ?channel=room&meta=info picks other channels (handy for two windows).
  const params = new URLSearchParams(location.search);
  if (params.get("channel")) $("channel").value = params.get("channel");
  if (params.has("meta")) $("meta-channel").value = params.get("meta");
  $("connect-form").addEventListener("submit", connect);
  $("send-form").addEventListener("submit", send);
  $("disconnect").addEventListener("click", disconnect);
  connect(); // by itself: no click needed
}

if (typeof document !== "undefined") init(); // a module runs once the page is parsed
