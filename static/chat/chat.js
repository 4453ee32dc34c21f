// Chat client for protocol v1 (docs/protocol.md). No build step.
(() => {
  "use strict";
  const app = document.getElementById("app");
  const list = document.getElementById("messages");
  const input = document.getElementById("input");
  const sendButton = document.getElementById("send");
  const stopButton = document.getElementById("stop");
  const connection = document.getElementById("connection");
  const welcome = document.getElementById("welcome");
  const useDocuments = document.getElementById("use-documents");
  const passageDialog = document.getElementById("passage");
  const maxChars = parseInt(app.dataset.maxChars || "16000", 10);

  let conversationId = app.dataset.conversationId || null;
  let socket = null;
  let retry = 0;
  const messages = new Map(); // id -> {role, text, status, sources, el}
  const pending = new Map(); // client_id -> {content, el}: sent, not yet acknowledged
  let streamingId = null;

  // offsets count code points, not UTF-16 units
  const cpLength = (s) => [...s].length;
  const uuid = () =>
    crypto.randomUUID ? crypto.randomUUID() :
      "10000000-1000-4000-8000-100000000000".replace(/[018]/g, (c) =>
        (c ^ (crypto.getRandomValues(new Uint8Array(1))[0] & (15 >> (c / 4)))).toString(16));

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/ws/chat/`);
    socket.onopen = () => {
      retry = 0;
      connection.hidden = true;
      if (conversationId) send({type: "open", conversation_id: conversationId});
      outbox.splice(0).forEach(send);
      // Unacknowledged sends go again: the same client_id makes this safe.
      for (const [clientId, p] of pending) {
        send({type: "send", conversation_id: conversationId, client_id: clientId, content: p.content, use_documents: p.useDocuments});
      }
    };
    socket.onmessage = (event) => { lastFrameAt = Date.now(); handle(JSON.parse(event.data)); };
    socket.onclose = (event) => {
      connection.hidden = false;
      if (event.code === 4401) { // the login ended (logged out elsewhere, expired): say so on the login page
        location.href = "/accounts/login/?session=ended&next=" + encodeURIComponent(location.pathname);
        return;
      }
      setTimeout(connect, Math.min(10000, 500 * 2 ** retry++));
    };
  }

  // A reply that has gone silent (its frames lost while Redis was down, say): ask the server how it stands.
  // `open` is answered from the database, so it works even when the channel layer does not.
  let lastFrameAt = Date.now();
  setInterval(() => {
    if (streamingId && conversationId && Date.now() - lastFrameAt > 20000) {
      lastFrameAt = Date.now();
      send({type: "open", conversation_id: conversationId});
    }
  }, 5000);

  // Frames sent while the socket is down wait here ("send" frames wait in `pending` instead).
  const outbox = [];

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(frame));
    else if (frame.type === "stop" || frame.type === "regenerate") outbox.push(frame);
  }

  function bubble(role, text, status) {
    welcome.hidden = true;
    const el = document.createElement("div");
    el.className = `message ${role}`;
    const body = document.createElement("div");
    body.className = "body";
    body.textContent = text;
    const meta = document.createElement("div");
    meta.className = "meta";
    el.append(body, meta);
    list.append(el);
    setStatus(el, status);
    return el;
  }

  function setStatus(el, status, detail) {
    el.dataset.status = status;
    const meta = el.querySelector(".meta");
    const labels = {streaming: "", complete: "", stopped: "Stopped", error: "Error", interrupted: "Interrupted", sending: "Sending…"};
    meta.textContent = detail || labels[status] || "";
  }

  // A reply's text, with each [n] that names one of its sources as a link that opens the passage.
  // A number with no such source stays plain text. Built from text nodes: nothing is parsed as HTML.
  function renderBody(entry) {
    const body = entry.el.querySelector(".body");
    if (entry.role !== "assistant" || !entry.sources || !entry.sources.length) {
      body.textContent = entry.text;
      return;
    }
    const byNumber = new Map(entry.sources.map((s) => [String(s.n), s]));
    const parts = [];
    let last = 0;
    for (const match of entry.text.matchAll(/\[(\d{1,3})\]/g)) {
      const source = byNumber.get(match[1]);
      if (!source) continue;
      parts.push(document.createTextNode(entry.text.slice(last, match.index)));
      const link = document.createElement("a");
      link.href = "#";
      link.className = "cite";
      link.textContent = match[0];
      link.title = source.title;
      link.setAttribute("aria-label", `Source ${source.n}: ${source.title}`);
      link.addEventListener("click", (event) => { event.preventDefault(); openPassage(source); });
      parts.push(link);
      last = match.index + match[0].length;
    }
    parts.push(document.createTextNode(entry.text.slice(last)));
    body.replaceChildren(...parts);
  }

  // The sources a reply drew on, listed under it.
  function renderSources(entry) {
    let box = entry.el.querySelector(".sources");
    if (!entry.sources || !entry.sources.length) { box?.remove(); return; }
    if (!box) {
      box = document.createElement("ol");
      box.className = "sources";
      box.setAttribute("aria-label", "Sources");
      entry.el.querySelector(".meta").before(box);
    }
    box.replaceChildren(...entry.sources.map((source) => {
      const item = document.createElement("li");
      item.value = source.n;
      const open = document.createElement("button");
      open.type = "button";
      open.className = "link";
      open.textContent = source.title + (source.page ? `, page ${source.page}` : "");
      open.addEventListener("click", () => openPassage(source));
      const where = document.createElement("small");
      where.textContent = source.heading || "";
      item.append(open, where);
      return item;
    }));
  }

  async function openPassage(source) {
    const title = document.getElementById("passage-title");
    const where = document.getElementById("passage-where");
    const text = document.getElementById("passage-text");
    title.textContent = `[${source.n}] ${source.title}`;
    where.textContent = [source.page ? `Page ${source.page}` : "", source.heading].filter(Boolean).join(" · ");
    text.textContent = source.snippet;
    passageDialog.showModal();
    try {
      const url = `/documents/${encodeURIComponent(source.document_id)}/passage/?start=${source.start}&end=${source.end}`;
      const response = await fetch(url, {headers: {Accept: "application/json"}});
      if (!response.ok) throw new Error(response.status === 404 ? "This document has been deleted." : "The passage could not be loaded.");
      const passage = await response.json();
      const mark = document.createElement("mark");
      mark.textContent = passage.passage;
      text.replaceChildren(document.createTextNode(passage.before), mark, document.createTextNode(passage.after));
      mark.scrollIntoView({block: "center"});
    } catch (error) {
      where.textContent = error.message;
    }
  }

  function addMessage(m) {
    let entry = messages.get(m.id);
    if (!entry) {
      entry = {role: m.role, text: "", status: m.status, sources: [], el: bubble(m.role, "", m.status)};
      messages.set(m.id, entry);
    }
    entry.text = m.content;
    entry.status = m.status;
    entry.sources = m.sources || [];
    renderBody(entry);
    renderSources(entry);
    setStatus(entry.el, m.status, m.error ? m.error.message : "");
    if (m.status === "streaming") setStreaming(m.id);
    return entry;
  }

  function setStreaming(id) {
    streamingId = id;
    stopButton.hidden = !id;
    sendButton.hidden = !!id;
  }

  function scrollDown() {
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 120;
    if (nearBottom) list.scrollTop = list.scrollHeight;
  }

  function handle(frame) {
    switch (frame.type) {
      case "history": {
        if (frame.conversation_id !== conversationId) return;
        useDocuments.checked = frame.use_documents !== false;
        messages.clear();
        list.querySelectorAll(".message").forEach((el) => el.remove());
        setStreaming(null);
        frame.messages.forEach(addMessage);
        for (const p of pending.values()) list.append(p.el); // still unacknowledged: keep at the end
        welcome.hidden = frame.messages.length > 0 || pending.size > 0;
        list.scrollTop = list.scrollHeight;
        break;
      }
      case "ack": {
        const p = pending.get(frame.client_id);
        if (!conversationId) {
          conversationId = frame.conversation_id;
          history.pushState({}, "", `/c/${conversationId}/`);
          addToSidebar(conversationId, p ? p.content : "New chat");
        }
        if (p) {
          pending.delete(frame.client_id);
          messages.set(frame.user_message_id, {role: "user", text: p.content, status: "complete", el: p.el});
          setStatus(p.el, "complete");
        }
        if (!messages.has(frame.assistant_message_id)) {
          addMessage({id: frame.assistant_message_id, role: "assistant", content: "", status: "streaming"});
        }
        scrollDown();
        break;
      }
      case "message":
        addMessage(frame.message);
        scrollDown();
        break;
      case "sources": {
        const entry = messages.get(frame.message_id) ||
          addMessage({id: frame.message_id, role: "assistant", content: "", status: "streaming"});
        entry.sources = frame.sources;
        renderBody(entry);
        renderSources(entry);
        break;
      }
      case "status": {
        const entry = messages.get(frame.message_id);
        if (!entry) return;
        const text = frame.state === "queued" ? `Waiting for the model (position ${frame.position})…` :
          frame.state === "warming_up" ? "The model is warming up…" :
          frame.state === "search_failed" ? "Your documents could not be searched; answering without them." : "";
        setStatus(entry.el, "streaming", text);
        break;
      }
      case "chunk": {
        let entry = messages.get(frame.message_id) ||
          addMessage({id: frame.message_id, role: "assistant", content: "", status: "streaming"});
        const have = cpLength(entry.text);
        if (frame.offset > have) { // a gap: re-sync from the server
          send({type: "open", conversation_id: conversationId});
          return;
        }
        const delta = [...frame.delta].slice(have - frame.offset).join(""); // drop any repeated part
        entry.text += delta;
        renderBody(entry);
        setStatus(entry.el, "streaming");
        setStreaming(frame.message_id);
        scrollDown();
        break;
      }
      case "done": {
        const entry = messages.get(frame.message_id);
        if (entry) {
          entry.status = frame.status;
          setStatus(entry.el, frame.status, frame.error ? frame.error.message : "");
        }
        if (streamingId === frame.message_id) setStreaming(null);
        break;
      }
      case "error": {
        const p = frame.client_id && pending.get(frame.client_id);
        if (p) {
          pending.delete(frame.client_id);
          setStatus(p.el, "error", frame.message);
          input.value = p.content;
        } else {
          toast(frame.message);
        }
        break;
      }
      case "document": {
        // An upload finished ingesting while the user chats (documents page: /documents/).
        if (frame.stage === "ready") toast(`“${frame.document.title}” is ready: answers can use it now.`);
        if (frame.stage === "failed") toast(`“${frame.document.title}” could not be ingested: ${frame.document.error}`);
        break;
      }
    }
  }

  function addToSidebar(id, title) {
    const nav = document.getElementById("conversation-list");
    document.getElementById("no-conversations")?.remove();
    nav.querySelectorAll("a.active").forEach((a) => a.classList.remove("active"));
    const a = document.createElement("a");
    a.href = `/c/${id}/`;
    a.dataset.id = id;
    a.className = "active";
    a.textContent = title.slice(0, 80);
    nav.prepend(a);
  }

  function toast(text) {
    const el = document.createElement("div");
    el.className = "toast";
    el.textContent = text;
    document.body.append(el);
    setTimeout(() => el.remove(), 5000);
  }

  document.getElementById("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const content = input.value;
    if (!content.trim() || streamingId) return;
    if (cpLength(content) > maxChars) { toast(`Messages can be at most ${maxChars} characters.`); return; }
    const clientId = uuid();
    pending.set(clientId, {content, useDocuments: useDocuments.checked, el: bubble("user", content, "sending")});
    input.value = "";
    scrollDown();
    send({type: "send", conversation_id: conversationId, client_id: clientId, content, use_documents: useDocuments.checked});
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      document.getElementById("composer").requestSubmit();
    }
  });
  stopButton.addEventListener("click", () => {
    if (!streamingId) return;
    const id = streamingId;
    const entry = messages.get(id);
    if (entry) setStatus(entry.el, "streaming", "Stopping…");
    send({type: "stop", message_id: id});
  });

  connect();
})();
