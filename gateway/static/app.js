// npcbus playground: pick a persona, chat over the gateway's WebSocket protocol
// (docs/websocket-protocol.md), watch the spoken line stream and see the structured response.
"use strict";

(function () {
  const TOKEN_KEY = "npcbus.playground.token";
  const $ = (id) => document.getElementById(id);
  const el = {
    token: $("token"), remember: $("remember"), persona: $("persona"), adapter: $("adapter"),
    playerName: $("player-name"), audience: $("audience"), location: $("location"), timeOfDay: $("time-of-day"),
    load: $("load"), connect: $("connect"), disconnect: $("disconnect"), setupForm: $("setup-form"),
    log: $("log"), chatForm: $("chat-form"), message: $("message"), send: $("send"), cancel: $("cancel"),
    status: $("status"), finalJson: $("final-json"), timings: $("timings"),
  };

  let ws = null;
  let sessionId = null;
  let turnSeq = 0;
  let running = null;            // turn id of the running turn
  const bubbles = new Map();     // turn id -> NPC line element

  function setStatus(text, state) {
    el.status.textContent = text;
    el.status.dataset.state = state;
  }

  function token() { return el.token.value.trim(); }

  function storeToken() {
    try {
      if (el.remember.checked && token()) localStorage.setItem(TOKEN_KEY, token());
      else localStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage may be disabled */ }
  }

  function addLine(kind, text) {
    const div = document.createElement("div");
    div.className = "line " + kind;
    div.textContent = text;
    el.log.appendChild(div);
    el.log.scrollTop = el.log.scrollHeight;
    return div;
  }

  async function api(path) {
    const resp = await fetch(path, { headers: { Authorization: "Bearer " + token() } });
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      const msg = (body.error && body.error.message) || resp.statusText;
      throw new Error(resp.status + ": " + msg);
    }
    return body;
  }

  async function loadPersonas() {
    if (!token()) { setStatus("enter the API token", "error"); return; }
    storeToken();
    try {
      const personas = await api("/v1/personas");
      el.persona.innerHTML = "";
      for (const p of personas.data) {
        const opt = document.createElement("option");
        opt.value = p.id;
        opt.textContent = p.name + " (" + p.id + ")";
        opt.title = p.description || "";
        el.persona.appendChild(opt);
      }
      const models = await api("/v1/models");
      el.adapter.innerHTML = "";
      const auto = document.createElement("option");
      auto.value = "__auto"; auto.textContent = "automatic (the persona's adapter, if any)";
      el.adapter.appendChild(auto);
      for (const m of models.data) {
        const opt = document.createElement("option");
        opt.value = m.adapter === null ? "__base" : m.id;
        opt.textContent = m.adapter === null ? m.id + " (base model)" : m.id + (m.version != null ? " v" + m.version : "");
        el.adapter.appendChild(opt);
      }
      setStatus("personas loaded", "disconnected");
    } catch (e) {
      setStatus("could not load: " + e.message, "error");
    }
  }

  function setChatting(on) {
    el.message.disabled = !on;
    el.send.disabled = !on;
    el.disconnect.disabled = !on;
    el.connect.disabled = on;
    el.cancel.disabled = !(on && running);
  }

  function startSession(event) {
    event.preventDefault();
    if (!token()) { setStatus("enter the API token", "error"); return; }
    if (!el.persona.value) { setStatus("load and pick a persona first", "error"); return; }
    storeToken();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    // Browsers cannot set an Authorization header on a WebSocket: the token travels as a subprotocol.
    ws = new WebSocket(scheme + "//" + location.host + "/v1/ws", ["npcbus.v1", "bearer." + token()]);
    setStatus("connecting…", "disconnected");
    ws.onopen = () => {
      const context = {};
      if (el.location.value.trim()) context.location = el.location.value.trim();
      if (el.timeOfDay.value.trim()) context.time_of_day = el.timeOfDay.value.trim();
      const start = {
        type: "session.start",
        persona_id: el.persona.value,
        player: { id: "playground", name: el.playerName.value.trim() || "Traveler" },
        audience: el.audience.value,
        context: context,
      };
      if (el.adapter.value === "__base") start.adapter = null;
      else if (el.adapter.value !== "__auto") start.adapter = el.adapter.value;
      ws.send(JSON.stringify(start));
    };
    ws.onmessage = (m) => handle(JSON.parse(m.data));
    ws.onclose = (e) => {
      setStatus("disconnected (" + e.code + (e.reason ? ": " + e.reason : "") + ")", e.code === 1000 ? "disconnected" : "error");
      addLine("system", "connection closed (" + e.code + ")");
      ws = null; sessionId = null; running = null;
      setChatting(false);
    };
    ws.onerror = () => setStatus("connection failed (check the token)", "error");
  }

  function handle(ev) {
    switch (ev.type) {
      case "session.started":
        sessionId = ev.session_id;
        setStatus("connected: " + ev.persona_id + (ev.adapter ? " / " + ev.adapter : ""), "connected");
        addLine("system", "session started with " + ev.persona_id);
        setChatting(true);
        el.message.focus();
        break;
      case "turn.accepted": {
        const b = addLine("npc", "");
        b.dataset.state = "streaming";
        b.dataset.deltas = "0";
        b.dataset.turn = ev.turn_id;
        bubbles.set(ev.turn_id, b);
        break;
      }
      case "turn.delta": {
        const b = bubbles.get(ev.turn_id);
        if (!b) break;
        b.textContent += ev.text;
        b.dataset.deltas = String(Number(b.dataset.deltas) + 1);
        document.body.dataset.deltas = String(Number(document.body.dataset.deltas) + 1);
        el.log.scrollTop = el.log.scrollHeight;
        break;
      }
      case "turn.final": {
        const b = bubbles.get(ev.turn_id) || addLine("npc", "");
        b.textContent = ev.response.dialogue;
        b.dataset.state = "final";
        const meta = document.createElement("span");
        meta.className = "meta";
        const who = ev.adapter ? ev.adapter + (ev.adapter_version != null ? " v" + ev.adapter_version : "") : "base model";
        meta.textContent = ev.response.emotion + " · " + ev.response.intent + " · " + who +
          " · first token " + fmt(ev.timings.ttft_ms) + " · total " + fmt(ev.timings.total_ms);
        b.appendChild(meta);
        if (!ev.replay) b.appendChild(feedbackButtons(ev.turn_id));
        el.finalJson.textContent = JSON.stringify(ev.response, null, 2);
        el.timings.textContent = JSON.stringify({ adapter: ev.adapter, adapter_version: ev.adapter_version, valid: ev.valid, ...ev.timings }, null, 2);
        document.body.dataset.finals = String(Number(document.body.dataset.finals) + 1);
        turnEnded(ev.turn_id);
        break;
      }
      case "turn.error": {
        const b = bubbles.get(ev.turn_id);
        if (b) { b.dataset.state = "error"; }
        addLine("error", ev.code + ": " + ev.message + (ev.retryable ? " (you may retry)" : ""));
        turnEnded(ev.turn_id);
        break;
      }
      case "turn.cancelled": {
        const b = bubbles.get(ev.turn_id);
        if (b) { b.dataset.state = "cancelled"; b.textContent += " …(cancelled)"; }
        turnEnded(ev.turn_id);
        break;
      }
      case "turn.feedback.accepted": {
        const b = bubbles.get(ev.turn_id);
        const box = b && b.querySelector(".feedback");
        if (box) {
          box.textContent = (ev.score > 0 ? "👍" : "👎") + " recorded for " +
            (ev.adapter ? ev.adapter + (ev.adapter_version != null ? " v" + ev.adapter_version : "") : "the base model");
          box.dataset.state = "recorded";
        }
        break;
      }
      case "error":
        if (ev.turn_id && ["feedback_disabled", "duplicate_feedback", "unavailable"].includes(ev.code)) {
          const b = bubbles.get(ev.turn_id);
          const box = b && b.querySelector(".feedback");
          if (box && ev.code === "unavailable") box.querySelectorAll("button").forEach((x) => { x.disabled = false; });
        }
        addLine("error", ev.code + ": " + ev.message);
        break;
      default:
        break;
    }
  }

  function feedbackButtons(turnId) {
    const box = document.createElement("span");
    box.className = "feedback";
    for (const [thumbs, label] of [["up", "👍"], ["down", "👎"]]) {
      const btn = document.createElement("button");
      btn.type = "button";
      btn.textContent = label;
      btn.title = "rate this answer (" + thumbs + "): it becomes training data for the NPC's adapter";
      btn.dataset.thumbs = thumbs;
      btn.addEventListener("click", () => {
        if (!ws || ws.readyState !== WebSocket.OPEN) return;
        box.querySelectorAll("button").forEach((x) => { x.disabled = true; });
        ws.send(JSON.stringify({ type: "turn.feedback", turn_id: turnId, thumbs: thumbs }));
      });
      box.appendChild(btn);
    }
    return box;
  }

  function fmt(ms) { return ms == null ? "–" : Math.round(ms) + " ms"; }

  function turnEnded(turnId) {
    if (running === turnId) running = null;
    el.cancel.disabled = !running;
  }

  function sendTurn(event) {
    event.preventDefault();
    const text = el.message.value.trim();
    if (!text || !ws || ws.readyState !== WebSocket.OPEN || !sessionId) return;
    turnSeq += 1;
    const turnId = "t" + Date.now().toString(36) + "-" + turnSeq;
    addLine("player", text);
    ws.send(JSON.stringify({ type: "turn", turn_id: turnId, text: text }));
    running = turnId;
    el.cancel.disabled = false;
    el.message.value = "";
  }

  function cancelTurn() {
    if (ws && running) ws.send(JSON.stringify({ type: "turn.cancel", turn_id: running }));
  }

  function endSession() {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "session.end" }));
  }

  el.load.addEventListener("click", loadPersonas);
  el.setupForm.addEventListener("submit", startSession);
  el.chatForm.addEventListener("submit", sendTurn);
  el.cancel.addEventListener("click", cancelTurn);
  el.disconnect.addEventListener("click", endSession);
  el.remember.addEventListener("change", storeToken);

  try {
    const saved = localStorage.getItem(TOKEN_KEY);
    if (saved) { el.token.value = saved; loadPersonas(); }
  } catch (e) { /* storage may be disabled */ }
})();
