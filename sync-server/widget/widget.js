// The Crewdesk web widget. Embed on the team's website:
//   <script src="https://RELAY/widget.js" data-key="wk_..." async></script>
// It lives in a shadow root (the page's CSS and the widget's never meet), talks only to the relay
// that served it, and sets message text with textContent only (never parsed as HTML).
(() => {
  "use strict";
  const me = document.currentScript || document.querySelector("script[data-key][src*='widget.js']");
  if (!me || window.__crewdesk) return;
  window.__crewdesk = true;
  const key = me.dataset.key || "";
  const base = new URL(me.src, location.href).origin;
  const api = base + "/api/widget/";
  const store = "crewdesk-" + key;
  const CSS = "__CREWDESK_CSS__";

  const el = (tag, props, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    e.append(...kids);
    return e;
  };
  const get = (k) => { try { return localStorage.getItem(store + k); } catch { return null; } };
  const put = (k, v) => { try { v == null ? localStorage.removeItem(store + k) : localStorage.setItem(store + k, v); } catch { /* private mode */ } };

  const host = el("div", { id: "crewdesk-widget" });
  const root = host.attachShadow({ mode: "open" });
  const badge = el("span", { class: "badge", hidden: "" });
  const launcher = el("button", { id: "launcher", type: "button", "aria-label": "Chat with us", "aria-expanded": "false", "aria-controls": "panel" },
    el("span", { "aria-hidden": "true", class: "icon", text: "💬" }), badge);
  const title = el("h2", { id: "title", text: "Chat with us" });
  const closeBtn = el("button", { id: "close", type: "button", class: "close", "aria-label": "Close chat", text: "×" });
  const greeting = el("p", { id: "greeting", class: "greeting" });
  const list = el("ol", { id: "messages", class: "messages", role: "log", "aria-live": "polite", "aria-label": "Messages" });
  const status = el("p", { id: "status", class: "status", role: "status", "aria-live": "polite" });
  const typing = el("p", { id: "typing", class: "typing", "aria-live": "polite", hidden: "" });
  const name = el("input", { id: "name", autocomplete: "name", required: "", maxlength: "100" });
  const email = el("input", { id: "email", type: "email", autocomplete: "email", maxlength: "200" });
  const text = el("textarea", { id: "text", rows: "2", required: "", placeholder: "Type your message…", "aria-label": "Message" });
  const file = el("input", { id: "file", type: "file", class: "hidden", tabindex: "-1", "aria-hidden": "true" });
  const attach = el("button", { id: "attach", type: "button", class: "tool", "aria-label": "Send a file", title: "Send a file", text: "📎", hidden: "" });
  const send = el("button", { id: "send", type: "submit", class: "send", text: "Start chat" });
  const who = el("div", { class: "who" },
    el("label", { for: "name", text: "Your name" }), name,
    el("label", { for: "email", text: "Email (optional, for replies when you are away)" }), email);
  const form = el("form", { id: "form", class: "composer", novalidate: "" }, who, text, el("div", { class: "row" }, attach, file, send));
  const panel = el("section", { id: "panel", class: "panel", role: "dialog", "aria-labelledby": "title", hidden: "" },
    el("header", {}, title, closeBtn), greeting, list, typing, status, form);
  root.append(el("style", { text: CSS }), panel, launcher);
  document.body.append(host);

  let session = get("-session");
  let ws = null, backoff = 1000, refused = false, pendingRef = 0, settingsOk = false;
  const shown = new Map();      // message id -> its element
  const pending = new Map();    // ref -> { el, text }
  const sentIds = new Map();    // id the relay gave -> pending element it replaces
  let seen = new Set(JSON.parse(get("-seen") || "[]"));
  let unread = 0;
  let typingTimer = 0, lastTyping = 0;

  const isOpen = () => !panel.hidden;
  const say = (msg, kind) => { status.textContent = msg || ""; status.className = "status" + (kind ? " " + kind : ""); };
  const setUnread = (n) => {
    unread = n;
    badge.hidden = n === 0;
    badge.textContent = n > 9 ? "9+" : String(n);
    launcher.setAttribute("aria-label", n ? `Chat with us, ${n} unread` : "Chat with us");
  };
  const markSeen = () => {
    for (const [id, e] of shown) if (e.classList.contains("crew")) seen.add(id);
    put("-seen", JSON.stringify([...seen].slice(-300)));
    setUnread(0);
  };
  const mode = () => {
    who.hidden = !!session;
    attach.hidden = !session;
    send.textContent = session ? "Send" : "Start chat";
    const off = refused || !settingsOk;
    for (const c of [name, email, text, send, attach]) c.disabled = off;
    // Nothing to type into where the chat cannot run: only why.
    form.hidden = list.hidden = refused;
  };

  const open = () => {
    panel.hidden = false;
    launcher.setAttribute("aria-expanded", "true");
    markSeen();
    (session || name.value ? text : name).focus();
    list.scrollTop = list.scrollHeight;
  };
  const close = () => {
    panel.hidden = true;
    launcher.setAttribute("aria-expanded", "false");
    launcher.focus();
  };
  launcher.onclick = () => (isOpen() ? close() : open());
  closeBtn.onclick = close;
  root.addEventListener("keydown", (e) => { if (e.key === "Escape" && isOpen()) { e.preventDefault(); close(); } });

  const time = (at) => new Date(at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const place = (row) => {
    // Ordered by (time, id): a reply that arrives late still lands where it belongs.
    const at = +row.dataset.at, id = row.dataset.id;
    let before = null;
    for (const r of list.children) {
      if (r.dataset.at === undefined) continue;
      if (+r.dataset.at > at || (+r.dataset.at === at && r.dataset.id > id)) { before = r; break; }
    }
    list.insertBefore(row, before);
  };
  const fileUrl = (a) => api + "blobs/" + encodeURIComponent(a.blob) + "?session=" + encodeURIComponent(session);
  const show = (m) => {
    if (shown.has(m.id)) return;
    const row = el("li", { class: "msg " + m.from, "data-id": m.id, "data-at": String(m.at) });
    if (m.from === "crew" && m.name) row.append(el("span", { class: "author", text: m.name }));
    const body = el("div", { class: "body" });
    if (m.attachment && session) {
      const url = fileUrl(m.attachment);
      if (m.attachment.mime.startsWith("image/")) {
        body.append(el("img", { class: "thumb", src: url + "&thumbnail=1", alt: m.attachment.file_name }));
      }
      body.append(el("a", { class: "file", href: url, target: "_blank", rel: "noopener",
        text: "📎 " + m.attachment.file_name + " (" + Math.max(1, Math.round(m.attachment.size / 1024)) + " KB)" }));
    } else {
      body.textContent = m.text;
    }
    if (m.join_url && /^https?:\/\//i.test(m.join_url)) {
      body.append(el("a", { class: "join", href: m.join_url, target: "_blank", rel: "noopener", text: "Join" }));
    }
    row.append(body, el("time", { text: time(m.at) }));
    const stand = sentIds.get(m.id);
    if (stand) { stand.remove(); sentIds.delete(m.id); }
    shown.set(m.id, row);
    place(row);
    if (m.from === "crew" && !seen.has(m.id)) {
      if (isOpen() && !document.hidden) seen.add(m.id);
      else setUnread(unread + 1);
    }
  };

  const connect = () => {
    if (!session || refused) return;
    ws = new WebSocket(base.replace(/^http/, "ws") + "/api/widget/ws?session=" + encodeURIComponent(session));
    ws.onopen = () => { backoff = 1000; say(""); for (const [ref, p] of pending) if (p.failed === "offline") resend(ref); };
    ws.onmessage = (e) => {
      let d; try { d = JSON.parse(e.data); } catch { return; }
      if (d.type === "typing") {
        // Someone of the crew is typing: said for a few seconds, or until their message arrives.
        typing.textContent = (d.name || "Someone") + " is typing…";
        typing.hidden = false;
        clearTimeout(typingTimer);
        typingTimer = setTimeout(() => { typing.hidden = true; }, 5000);
      } else if (d.type === "messages") {
        if (d.messages.some((m) => m.from === "crew")) { typing.hidden = true; clearTimeout(typingTimer); }
        d.messages.forEach(show);
        if (isOpen()) { markSeen(); list.scrollTop = list.scrollHeight; }
      } else if (d.type === "sent") {
        const p = pending.get(d.ref);
        if (p) { pending.delete(d.ref); p.el.classList.remove("sending"); sentIds.set(d.id, p.el); }
      } else if (d.type === "error") {
        const p = d.ref && pending.get(d.ref);
        if (p) fail(d.ref, d.error);
        else say(d.error, "error");
      }
    };
    ws.onclose = (e) => {
      ws = null;
      for (const [ref, p] of pending) if (!p.failed) fail(ref, "not sent: the connection was lost", "offline");
      if (e.code === 4003) { refused = true; mode(); return; }
      if (e.code === 4001) {
        session = null; put("-session", null); mode();
        say("Your previous chat has ended. Write to start a new one.");
        return;
      }
      if (e.code !== 4008) say("Connection lost. Reconnecting…");
      const wait = backoff * (0.75 + Math.random() / 2);
      backoff = Math.min(backoff * 2, 30000);
      setTimeout(connect, wait);
    };
  };

  const fail = (ref, why, kind) => {
    const p = pending.get(ref);
    if (!p) return;
    p.failed = kind || "error";
    p.el.classList.remove("sending");
    p.el.classList.add("failed");
    p.el.querySelector(".note")?.remove();
    p.el.append(el("span", { class: "note" }, why + " ",
      el("button", { type: "button", class: "retry", text: "Retry", onclick: () => resend(ref) })));
  };
  const resend = (ref) => {
    const p = pending.get(ref);
    if (!p || !ws || ws.readyState !== 1) return;
    p.failed = null;
    p.el.classList.remove("failed");
    p.el.classList.add("sending");
    p.el.querySelector(".note")?.remove();
    ws.send(JSON.stringify({ type: "message", text: p.text, ref }));
  };

  const post = async (path, opts) => {
    const r = await fetch(api + path, opts);
    const d = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(d.error || `the chat answered ${r.status}`);
    return d;
  };

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const t = text.value.trim();
    if (!t) { say("Write a message first.", "error"); text.focus(); return; }
    if (session) {
      const ref = "c" + (++pendingRef);
      const row = el("li", { class: "msg customer sending" }, el("div", { class: "body", text: t }));
      list.append(row);
      list.scrollTop = list.scrollHeight;
      pending.set(ref, { el: row, text: t });
      text.value = "";
      if (ws && ws.readyState === 1) ws.send(JSON.stringify({ type: "message", text: t, ref }));
      else fail(ref, "not sent: reconnecting", "offline");
      return;
    }
    if (!name.value.trim()) { say("Please tell us your name.", "error"); name.focus(); return; }
    send.disabled = true;
    say("Starting your chat…");
    try {
      const d = await post(encodeURIComponent(key) + "/conversations", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ name: name.value.trim(), email: email.value.trim(), text: t }),
      });
      session = d.session; put("-session", session);
      text.value = ""; say(""); mode(); connect(); text.focus();
    } catch (err) {
      say(err.message === "Failed to fetch" ? "Cannot reach the chat right now; try again in a moment." : err.message, "error");
    } finally { send.disabled = refused; }
  });
  // The crew sees that the customer is typing (said at most every 2 s).
  text.addEventListener("input", () => {
    const now = Date.now();
    if (!session || !ws || ws.readyState !== 1 || !text.value || now - lastTyping < 2000) return;
    lastTyping = now;
    ws.send(JSON.stringify({ type: "typing" }));
  });
  text.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
  });
  attach.onclick = () => file.click();
  file.onchange = async () => {
    const f = file.files[0];
    if (!f || !session) return;
    say("Sending " + f.name + "…");
    try {
      await post("blobs?session=" + encodeURIComponent(session), {
        method: "POST", headers: { "content-type": f.type || "application/octet-stream", "x-file-name": encodeURIComponent(f.name) }, body: f,
      });
      say("");
    } catch (err) { say(f.name + " was not sent: " + err.message, "error"); }
    file.value = "";
  };
  document.addEventListener("visibilitychange", () => { if (!document.hidden && isOpen()) markSeen(); });

  // The team's name and greeting; a page the team does not list is told so here.
  const settings = async () => {
    try {
      const r = await fetch(api + encodeURIComponent(key) + "/settings");
      const d = await r.json().catch(() => ({}));
      if (!r.ok) {
        say(d.error || "This chat is not available here.", "error");
        if (r.status === 403 || r.status === 404) { refused = true; mode(); return; }
        throw new Error();
      }
      settingsOk = true;
      title.textContent = d.team;
      greeting.textContent = d.greeting;
      launcher.setAttribute("title", "Chat with " + d.team);
      mode();
      connect();
    } catch {
      say("Cannot reach the chat right now. Retrying…", "error");
      mode();
      setTimeout(settings, backoff);
      backoff = Math.min(backoff * 2, 30000);
    }
  };
  mode();
  settings();
})();
