/*
 * pgws-client.js: the browser client of pgws (SPEC §10). One ES module, no dependencies, no
 * build step. pgws serves it at /pgws-client.js; it is also clients/js/ of the repository.
 *
 *   import { PgwsClient } from "/pgws-client.js";
 *   const client = new PgwsClient("wss://example.com", { token: () => fetchToken() });
 *   client.subscribe("room:1", (data, info) => show(data));
 *   await client.publish("room:1", { text: "hi" });
 *
 * It speaks protocol v2 (subprotocol `pgws.v2`, SPEC §8): the token goes in the first frame
 * (never in the URL), so a refused token is an `err` the client can read. It reconnects by
 * itself with jittered exponential back-off, resubscribes each channel from the last position
 * it saw (durable channels), refreshes the token through the `token` callback when the server
 * says `expiring`, and reports every loss of continuity through `onGap`. Against a server that
 * does not speak v2 it falls back to the legacy protocol (SPEC §2-3): one socket per channel,
 * `/<channel>/<token>`, no resume (each reconnect is a gap), no refresh (3001 reconnects).
 */

export const SUBPROTOCOL = "pgws.v2";

/* What close codes mean, in plain words (for status lines and logs). */
export const CLOSE_REASONS = Object.freeze({
  1000: "normal closure",
  1001: "server going away (restart or shutdown)",
  1006: "connection lost (no close frame: the server may be down or refused the handshake)",
  1008: "policy violation (e.g. slow consumer)",
  1009: "message too big",
  1011: "server error",
  3001: "token expired",
  4401: "token refused",
});

/* An `err` reply, or a request the client could not deliver. `retry`: the same request may
   work later (429, 503, or the connection was not open). */
export class PgwsError extends Error {
  constructor(code, reason, retry) {
    super(`pgws ${code}: ${reason}`);
    this.name = "PgwsError";
    this.code = code;
    this.reason = reason;
    this.retry = Boolean(retry);
  }
}

/* The back-off ceiling before attempt `n` (0-based): min * 2^n, capped at max. The delay is
   drawn uniformly below it ("full jitter"), so clients cut off together do not return together. */
export function backoffCeiling(n, min, max) {
  return Math.min(max, min * 2 ** Math.min(n, 30));
}

/* "Describe a close" for people: "1001 server going away (restart or shutdown)". */
export function describeClose(code, reason) {
  if (!code) return reason || "not connected"; // no socket was opened (e.g. the token callback failed)
  const meaning = CLOSE_REASONS[code] || "closed by the server or the network";
  return `${code} ${meaning}` + (reason ? ` (reason: ${reason})` : "");
}

/* Legacy frames and v2 `data`: JSON when it parses, else the text itself. */
function parseData(text) {
  try {
    return JSON.parse(text);
  } catch (_) {
    return text;
  }
}

function trimUrl(url) {
  return String(url).trim().replace(/\/+$/, "");
}

const DEFAULTS = Object.freeze({
  backoffMin: 500, // ms: the first retry waits up to this long
  backoffMax: 30000, // ms: no retry waits longer
  legacy: true, // fall back to the legacy protocol against a server without v2
  pingInterval: 25000, // ms: a `ping` when the socket was quiet this long; 0: never
  WebSocket: undefined, // the WebSocket class (globalThis.WebSocket unless given)
});

export class PgwsClient {
  /**
   * @param {string} url   ws:// or wss:// base URL of the pgws server (no token, no channel)
   * @param {object} options
   *   token(): string | Promise<string>   required; called before each connection and on
   *                                       `expiring`, it returns a (fresh) JWT
   *   onState(state, info)   "connecting" | "open" | "reconnecting" | "closed"; info has
   *                          `protocol`, and for "reconnecting" `code`, `reason`, `attempt`,
   *                          `delay`, `ceiling` (ms)
   *   onGap(channel, why, detail)   continuity on `channel` was lost: reload what it shows.
   *                          `why` is "reconnected" (nothing to resume from), "not recovered"
   *                          (the server could not replay from the position; `detail` is its
   *                          reason), "server" (a `gap` frame), "dropped" (a refreshed token
   *                          no longer grants it)
   *   onSubscribed(channel, info)   the server confirmed a subscription (also after each
   *                          reconnect): {resumed, recovered}
   *   onRefresh(info)        the token was refreshed on the open socket: {exp, dropped}
   *   onError(error)         a problem that does not end the client (a failed refresh, a
   *                          refused token, a token callback that threw)
   *   backoffMin, backoffMax, legacy, pingInterval, WebSocket: see DEFAULTS
   */
  constructor(url, options = {}) {
    if (typeof options.token !== "function") throw new TypeError("options.token must be a function");
    this.url = trimUrl(url);
    this.options = { ...DEFAULTS, ...options };
    this.protocol = null; // "v2" | "legacy" once a socket is open
    this.state = "idle";
    this._WebSocket = this.options.WebSocket || globalThis.WebSocket;
    this._subs = new Map(); // channel -> {handlers:Set, echo, pos, live, everLive}
    this._pending = new Map(); // ref -> {resolve, reject, kind, channel}
    this._nextRef = 1;
    this._sockets = []; // the current connection's sockets (v2: one; legacy: one per channel)
    this._attempt = 0; // failed attempts since the last good connection
    this._generation = 0; // bumped on every (re)connect: late events of old sockets are ignored
    this._timers = new Set();
    this._closed = false;
    this._legacyServer = false; // learnt: this server does not speak v2
    this._online = () => this._retryNow();
    if (typeof addEventListener === "function") addEventListener("online", this._online);
    this._connect();
  }

  /** Receive messages of `channel`: handler(data, {channel, pos}). Returns {unsubscribe()}. */
  subscribe(channel, handler, { echo = true } = {}) {
    if (typeof channel !== "string" || channel === "") throw new TypeError("channel must be a non-empty string");
    let sub = this._subs.get(channel);
    if (!sub) {
      sub = { handlers: new Set(), echo: Boolean(echo), pos: undefined, live: false, everLive: false };
      this._subs.set(channel, sub);
      this._sendSub(channel, sub);
    }
    sub.handlers.add(handler);
    return { unsubscribe: () => this._unsubscribe(channel, handler) };
  }

  /** Publish `data` (any JSON value; a string is sent as is) to one channel. Resolves with the
      server's `ok` ({ch, pos} for durable channels) or rejects with a PgwsError. */
  publish(channel, data) {
    if (this.protocol === "legacy") return this._legacyPublish(channel, data);
    return this._request({ op: "pub", ch: channel, data: data }, "pub");
  }

  /** The channels subscribed and the last position seen on each (durable channels). */
  positions() {
    const out = {};
    for (const [channel, sub] of this._subs) if (sub.pos !== undefined) out[channel] = sub.pos;
    return out;
  }

  /** Stop for good: close the socket(s), cancel timers, reject pending requests. */
  close() {
    if (this._closed) return;
    this._closed = true;
    if (typeof removeEventListener === "function") removeEventListener("online", this._online);
    this._teardown(1000, "bye");
    this._setState("closed", { code: 1000, reason: "bye", protocol: this.protocol });
  }

  // ---------- connecting ----------

  async _connect() {
    if (this._closed) return;
    const generation = ++this._generation;
    this._setState("connecting", { attempt: this._attempt, protocol: this.protocol });
    let token;
    try {
      token = await this.options.token();
    } catch (error) {
      if (generation !== this._generation) return;
      this._report(error);
      this._scheduleReconnect(0, "token callback failed: " + (error && error.message));
      return;
    }
    if (generation !== this._generation || this._closed) return;
    this._token = String(token);
    if (this._legacyServer) this._openLegacy(generation);
    else this._openV2(generation);
  }

  _openV2(generation) {
    let ws;
    try {
      ws = new this._WebSocket(this.url + "/", [SUBPROTOCOL]);
    } catch (error) {
      this._report(error);
      this._scheduleReconnect(0, String(error && error.message));
      return;
    }
    this._sockets = [ws];
    let opened = false;
    ws.onopen = () => {
      if (generation !== this._generation) return;
      opened = true;
      if (ws.protocol !== SUBPROTOCOL) {
        // A server that accepted without selecting v2: speak legacy to it from now on.
        this._legacyServer = true;
        this._drop(ws);
        this._connect();
        return;
      }
      this._send(ws, { op: "auth", token: this._token, ref: this._ref("auth") });
      this._armPing(ws, generation);
    };
    ws.onmessage = (event) => {
      if (generation === this._generation) this._onV2Frame(ws, event.data);
    };
    ws.onerror = () => {}; // no detail in browsers: onclose, which follows, has the code
    ws.onclose = (event) => {
      if (generation !== this._generation) return;
      if (!opened && this.options.legacy && !this._everOpen) {
        this._maybeLegacy(generation, event);
        return;
      }
      this._lost(event.code, event.reason);
    };
  }

  /* A v2 handshake refused before any socket ever opened: the server may be a legacy one, which
     refuses an upgrade without a token in the URL. Try legacy once when the server answers HTTP
     (so a server that is merely down is not taken for a legacy one); else back off. */
  async _maybeLegacy(generation, event) {
    let answers = false;
    try {
      await fetch(this.url.replace(/^ws/, "http") + "/", { mode: "no-cors", cache: "no-store" });
      answers = true;
    } catch (_) {
      answers = false;
    }
    if (generation !== this._generation || this._closed) return;
    if (!answers || this._triedLegacy) {
      this._triedLegacy = false;
      this._lost(event.code, event.reason);
      return;
    }
    this._triedLegacy = true;
    this._openLegacy(generation, true);
  }

  _onV2Frame(ws, text) {
    this._lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (_) {
      return; // not ours: pgws sends only JSON objects on v2
    }
    if (!frame || typeof frame !== "object") return;
    switch (frame.op) {
      case "msg":
        this._deliver(frame.ch, frame.data, frame.pos);
        break;
      case "ok":
      case "err":
        this._reply(ws, frame);
        break;
      case "gap": {
        const sub = this._subs.get(frame.ch);
        if (sub) this._gap(frame.ch, "server");
        break;
      }
      case "expiring":
        this._expiring(ws, Number(frame.in));
        break;
      default:
        break; // pong, and ops of later versions
    }
  }

  _reply(ws, frame) {
    const pending = this._pending.get(frame.ref);
    if (!pending) return;
    this._pending.delete(frame.ref);
    if (pending.kind === "auth") this._authReply(ws, frame, pending);
    else if (pending.kind === "sub") this._subReply(frame, pending);
    else if (frame.op === "ok") pending.resolve(frame);
    else pending.reject(new PgwsError(frame.code, frame.reason, frame.retry));
  }

  _authReply(ws, frame, pending) {
    if (frame.op === "err") {
      const error = new PgwsError(frame.code, frame.reason, frame.retry);
      this._report(error); // a first auth that failed is closed 4401 by the server: we reconnect
      if (pending.refresh) this._refreshing = false;
      return;
    }
    if (pending.refresh) {
      this._refreshing = false;
      for (const channel of frame.dropped || []) this._ended(channel);
      this._emit("onRefresh", { exp: frame.exp, dropped: frame.dropped || [] });
      return;
    }
    // First auth: the connection is good. Subscribe everything, resuming where we were.
    this._attempt = 0;
    this._everOpen = true;
    this._triedLegacy = false;
    this.protocol = "v2";
    this._authenticated = true;
    this._setState("open", { protocol: "v2", exp: frame.exp });
    for (const [channel, sub] of this._subs) this._sendSub(channel, sub);
  }

  _subReply(frame, pending) {
    const channel = pending.channel;
    const sub = pending.sub;
    if (this._subs.get(channel) !== sub) return; // unsubscribed meanwhile (its unsub follows)
    if (frame.op === "err") {
      sub.live = false;
      this._report(new PgwsError(frame.code, `sub ${channel}: ${frame.reason}`, frame.retry));
      if (frame.retry) {
        // 429, 503 (e.g. the database is needed to resume): ask again later on this socket.
        const generation = this._generation;
        const wait = this.options.backoffMin + Math.random() * this.options.backoffMin;
        this._later(wait, () => {
          if (generation === this._generation && this._subs.get(channel) === sub) {
            this._sendSub(channel, sub);
          }
        });
      }
      return;
    }
    if (frame.pos !== undefined && sub.pos === undefined) sub.pos = frame.pos; // where "now" is
    const resumed = pending.from !== undefined;
    const wasLive = sub.everLive;
    sub.live = true;
    sub.everLive = true;
    this._emit("onSubscribed", channel, { resumed: resumed, recovered: frame.recovered === true });
    if (resumed && frame.recovered === false) {
      sub.pos = undefined;
      this._gap(channel, "not recovered", frame.reason);
    } else if (!resumed && wasLive) {
      this._gap(channel, "reconnected"); // it was live before: what happened meanwhile is lost
    }
  }

  _sendSub(channel, sub) {
    if (this.protocol === "legacy") {
      if (this.state === "open") this._reconnectNow(); // legacy: one more socket, reopened together
      return; // else the next connection opens it
    }
    const ws = this._v2Socket();
    if (!ws || !this._authenticated) return; // sent once the next connection is authenticated
    const request = { op: "sub", ch: channel };
    if (!sub.echo) request.echo = false;
    if (sub.pos !== undefined) request.from = sub.pos;
    const ref = this._ref("sub", { channel: channel, sub: sub, from: request.from });
    request.ref = ref;
    sub.requested = true; // on this socket: an unsub must follow if it is dropped
    this._send(ws, request);
  }

  _unsubscribe(channel, handler) {
    const sub = this._subs.get(channel);
    if (!sub) return;
    sub.handlers.delete(handler);
    if (sub.handlers.size > 0) return;
    this._subs.delete(channel);
    const ws = this._v2Socket();
    if (ws && this._authenticated && sub.requested) {
      this._send(ws, { op: "unsub", ch: channel, ref: this._ref("unsub") });
    }
    if (this.protocol === "legacy" && this.state === "open") this._reconnectNow();
  }

  _deliver(channel, data, pos) {
    const sub = this._subs.get(channel);
    if (!sub) return;
    if (pos !== undefined) sub.pos = pos;
    for (const handler of [...sub.handlers]) {
      try {
        handler(data, { channel: channel, pos: pos });
      } catch (error) {
        this._report(error); // one handler's bug never stops delivery to the others
      }
    }
  }

  _gap(channel, why, detail) {
    this._emit("onGap", channel, why, detail);
  }

  _ended(channel) {
    const sub = this._subs.get(channel);
    if (!sub) return;
    sub.live = false;
    sub.everLive = false;
    this._subs.delete(channel);
    this._gap(channel, "dropped");
  }

  // ---------- token refresh ----------

  /* `expiring` comes PGWS_EXPIRY_WARNING seconds before `exp`. Refresh half-way through what is
     left: early enough for a slow token endpoint, and a token shorter than the warning does not
     make the client ask for tokens in a tight loop. */
  _expiring(ws, seconds) {
    if (this._refreshTimer || !Number.isFinite(seconds)) return;
    const generation = this._generation;
    this._refreshTimer = this._later(Math.max(seconds, 0) * 500, async () => {
      this._refreshTimer = null;
      if (generation !== this._generation || this._refreshing) return;
      this._refreshing = true;
      let token;
      try {
        token = String(await this.options.token());
      } catch (error) {
        this._refreshing = false;
        this._report(error); // the socket closes with 3001 at exp, and reconnects
        return;
      }
      if (generation !== this._generation) return;
      this._token = token;
      this._send(ws, { op: "auth", token: token, ref: this._ref("auth", { refresh: true }) });
    });
  }

  // ---------- requests ----------

  _ref(kind, extra = {}) {
    const ref = this._nextRef++;
    this._pending.set(ref, { kind: kind, resolve: () => {}, reject: () => {}, ...extra });
    return ref;
  }

  _request(request, kind) {
    const ws = this._v2Socket();
    if (!ws || !this._authenticated) {
      return Promise.reject(new PgwsError(0, "not connected", true));
    }
    return new Promise((resolve, reject) => {
      const ref = this._nextRef++;
      this._pending.set(ref, { kind: kind, resolve: resolve, reject: reject });
      this._send(ws, { ...request, ref: ref });
    });
  }

  _send(ws, value) {
    ws.send(JSON.stringify(value));
  }

  _v2Socket() {
    const ws = this._sockets[0];
    return this.protocol !== "legacy" && ws && ws.readyState === 1 ? ws : null;
  }

  /* Keep-alive from our side: browsers cannot see a half-open TCP connection, so when the
     socket has been quiet for pingInterval we send a `ping`; when nothing at all has come back
     pingInterval after it, the connection is taken for lost. Judged from the ping actually sent,
     so timers throttled in a background tab cannot make a healthy socket look dead. */
  _armPing(ws, generation) {
    const interval = this.options.pingInterval;
    if (!interval) return;
    this._lastFrameAt = Date.now();
    let pingSentAt = 0; // 0: no ping waiting for an answer
    const tick = () => {
      if (generation !== this._generation) return;
      const now = Date.now();
      if (pingSentAt && this._lastFrameAt < pingSentAt && now - pingSentAt >= interval) {
        this._lost(1006, "no answer to ping");
        return;
      }
      if (pingSentAt && this._lastFrameAt >= pingSentAt) pingSentAt = 0; // answered
      // Never before the first `auth` is answered: the server takes any other op then for a
      // failed auth (401, close 4401).
      if (!pingSentAt && now - this._lastFrameAt >= interval && this._authenticated) {
        this._send(ws, { op: "ping" });
        pingSentAt = now;
      }
      this._later(interval / 2, tick);
    };
    this._later(interval / 2, tick);
  }

  // ---------- legacy fallback (SPEC §2-3) ----------

  /* One socket per subscribed channel, `/<channel>/<token>`, so a publish goes to that channel
     only (a legacy frame goes to every channel of its socket). `probe`: first contact, to learn
     whether the server speaks legacy at all. */
  _openLegacy(generation, probe = false) {
    const channels = [...this._subs.keys()];
    if (channels.length === 0 && !probe) {
      this._legacyOpened(generation, probe, channels); // nothing to open until a subscription
      return;
    }
    // A probe without subscriptions opens `/<token>` (every channel of the token) and drops it.
    const paths = channels.length ? channels.map((ch) => "/" + encodeURIComponent(ch)) : [""];
    let open = 0;
    this._sockets = [];
    for (const [index, path] of paths.entries()) {
      const channel = channels[index];
      let ws;
      try {
        ws = new this._WebSocket(this.url + path + "/" + this._token);
      } catch (error) {
        this._report(error);
        this._lost(1006, String(error && error.message));
        return;
      }
      ws.pgwsChannel = channel;
      this._sockets.push(ws);
      ws.onopen = () => {
        if (generation !== this._generation) return;
        if (++open < paths.length) return;
        if (channel === undefined) {
          this._drop(ws);
          this._sockets = [];
        }
        this._legacyOpened(generation, probe, channels);
      };
      ws.onmessage = (event) => {
        if (generation === this._generation && channel !== undefined) {
          this._deliver(channel, parseData(event.data), undefined);
        }
      };
      ws.onerror = () => {};
      ws.onclose = (event) => {
        if (generation !== this._generation) return;
        if (probe && open < paths.length) {
          this._legacyServer = false; // not legacy either: back to v2 with back-off
        }
        this._lost(event.code, event.reason);
      };
    }
  }

  _legacyOpened(generation, probe, channels) {
    if (generation !== this._generation) return;
    this._legacyServer = true;
    this._attempt = 0;
    this.protocol = "legacy";
    const first = !this._everOpen;
    this._everOpen = true;
    this._setState("open", { protocol: "legacy", probe: probe });
    for (const channel of channels) {
      const sub = this._subs.get(channel);
      if (!sub) continue; // unsubscribed meanwhile
      const gap = sub.everLive && !first; // legacy cannot resume
      sub.live = sub.everLive = true;
      this._emit("onSubscribed", channel, { resumed: false, recovered: false });
      if (gap) this._gap(channel, "reconnected");
    }
    // Subscribed or unsubscribed while these sockets were opening: open the set again.
    const now = [...this._subs.keys()];
    if (now.length !== channels.length || now.some((ch) => !channels.includes(ch))) {
      this._reconnectNow();
    }
  }

  _legacyPublish(channel, data) {
    const ws = this._sockets.find((s) => s.pgwsChannel === channel && s.readyState === 1);
    if (!ws) {
      const reason = this._subs.has(channel)
        ? "not connected"
        : "legacy server: subscribe to a channel before publishing to it";
      return Promise.reject(new PgwsError(0, reason, this._subs.has(channel)));
    }
    ws.send(typeof data === "string" ? data : JSON.stringify(data));
    return Promise.resolve({ op: "ok", ch: channel });
  }

  // ---------- losing and regaining the connection ----------

  _lost(code, reason) {
    if (this._closed) return;
    this._teardown(code, reason);
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code, reason) {
    if (this._closed) return;
    const generation = ++this._generation;
    const ceiling = backoffCeiling(this._attempt, this.options.backoffMin, this.options.backoffMax);
    const delay = Math.floor(Math.random() * ceiling);
    this._attempt += 1;
    this._setState("reconnecting", {
      code: code,
      reason: reason,
      attempt: this._attempt,
      delay: delay,
      ceiling: ceiling,
      protocol: this.protocol,
    });
    this._reconnectTimer = this._later(delay, () => {
      this._reconnectTimer = null;
      if (generation === this._generation) this._connect();
    });
  }

  /* The browser says the network is back: skip the rest of the back-off. */
  _retryNow() {
    if (this._reconnectTimer && !this._closed) {
      this._clear(this._reconnectTimer);
      this._reconnectTimer = null;
      this._connect();
    }
  }

  _reconnectNow() {
    this._teardown(1000, "resubscribing");
    this._connect();
  }

  /* Close the current socket(s); fail what waited for their replies. */
  _teardown(code, reason) {
    this._generation++;
    for (const ws of this._sockets) this._drop(ws);
    this._sockets = [];
    this._authenticated = false;
    this._refreshing = false;
    if (this._refreshTimer) this._clear(this._refreshTimer);
    this._refreshTimer = null;
    for (const timer of this._timers) clearTimeout(timer);
    this._timers.clear();
    this._reconnectTimer = null;
    for (const sub of this._subs.values()) sub.live = sub.requested = false;
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const request of pending) {
      request.reject(new PgwsError(0, `connection lost (${describeClose(code, reason)}); the request may or may not have been carried out`, true));
    }
  }

  _drop(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    try {
      if (ws.readyState === 0 || ws.readyState === 1) ws.close(1000, "bye");
    } catch (_) {
      /* already closing */
    }
  }

  // ---------- small helpers ----------

  _later(ms, fn) {
    const timer = setTimeout(() => {
      this._timers.delete(timer);
      fn();
    }, ms);
    this._timers.add(timer);
    return timer;
  }

  _clear(timer) {
    clearTimeout(timer);
    this._timers.delete(timer);
  }

  _setState(state, info) {
    this.state = state;
    this._emit("onState", state, info);
  }

  _report(error) {
    if (!this._emit("onError", error)) console.warn("pgws:", error);
  }

  _emit(name, ...args) {
    const callback = this.options[name];
    if (typeof callback !== "function") return false;
    try {
      callback(...args);
    } catch (error) {
      if (name !== "onError") this._report(error);
    }
    return true;
  }
}
