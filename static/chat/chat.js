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
  const connectionState = document.getElementById("connection-state");
  const jumpButton = document.getElementById("jump");
  const csrf = app.dataset.csrf;
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
      showConnection("connected");
      if (conversationId) send({type: "open", conversation_id: conversationId});
      outbox.splice(0).forEach(send);
      // Unacknowledged sends go again: the same client_id makes this safe.
      for (const [clientId, p] of pending) sendPending(clientId, p);
    };
    socket.onmessage = (event) => { lastFrameAt = Date.now(); handle(JSON.parse(event.data)); };
    socket.onclose = (event) => {
      connection.hidden = false;
      showConnection(navigator.onLine ? "reconnecting" : "offline");
      if (event.code === 4401) { // the login ended (logged out elsewhere, expired): say so on the login page
        location.href = "/accounts/login/?session=ended&next=" + encodeURIComponent(location.pathname);
        return;
      }
      if (event.code === 4429) { // this user has too many sockets open: wait for one to close
        connection.textContent = "Too many tabs are open: close one, and this one reconnects.";
        setTimeout(connect, 30000);
        return;
      }
      setTimeout(connect, Math.min(10000, 500 * 2 ** retry++));
    };
  }

  function showConnection(state) {
    connectionState.dataset.state = state;
    connectionState.textContent = {connecting: "Connecting…", connected: "Connected", reconnecting: "Reconnecting…", offline: "Offline"}[state];
    connection.textContent = state === "offline" ? "You are offline: messages wait until the connection is back." : "Reconnecting…";
  }
  addEventListener("offline", () => showConnection("offline"));
  addEventListener("online", () => { if (socket && socket.readyState !== WebSocket.OPEN) showConnection("reconnecting"); });

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
    const actions = document.createElement("div");
    actions.className = "actions";
    el.append(body, meta, actions);
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

  // An assistant reply is markdown, rendered safely (render.js); a user's message is plain text.
  // While a reply streams, it is rendered at most once per frame.
  function renderBody(entry) {
    const body = entry.el.querySelector(".body");
    if (entry.role !== "assistant") {
      body.textContent = entry.text;
      return;
    }
    if (entry.frame) return;
    entry.frame = requestAnimationFrame(() => {
      entry.frame = null;
      body.replaceChildren(ChatRender.markdown(entry.text, entry.sources, openPassage));
      followIfPinned();
    });
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
      entry.el.dataset.id = m.id;
      messages.set(m.id, entry);
    }
    entry.text = m.content;
    entry.status = m.status;
    entry.sources = m.sources || [];
    entry.replyTo = m.reply_to || entry.replyTo || null;
    if (m.feedback !== undefined) entry.feedback = m.feedback;
    renderBody(entry);
    renderSources(entry);
    renderActions(m.id, entry);
    setStatus(entry.el, m.status, m.error ? m.error.message : "");
    if (m.status === "streaming") setStreaming(m.id);
    return entry;
  }

  function setStreaming(id) {
    streamingId = id;
    stopButton.hidden = !id;
    sendButton.hidden = !!id;
    for (const [messageId, entry] of messages) renderActions(messageId, entry);
  }

  // --- earlier messages: `history` holds the latest page; `open` with `before` gets the one before it --
  const earlierButton = document.createElement("button");
  earlierButton.type = "button";
  earlierButton.className = "secondary earlier";
  earlierButton.id = "earlier";
  earlierButton.textContent = "Load earlier messages";
  earlierButton.hidden = true;
  list.prepend(earlierButton);
  let loadingEarlier = false;
  function loadEarlier() {
    const oldest = list.querySelector(".message[data-id]");
    if (loadingEarlier || earlierButton.hidden || !oldest || !conversationId) return;
    loadingEarlier = true;
    earlierButton.disabled = true;
    send({type: "open", conversation_id: conversationId, before: oldest.dataset.id});
  }
  earlierButton.addEventListener("click", loadEarlier);
  function showEarlier(more) {
    earlierButton.hidden = !more;
    earlierButton.disabled = false;
    loadingEarlier = false;
  }

  // An earlier page goes above what is shown; the view stays where the user was reading.
  function prependPage(frame) {
    const first = earlierButton.nextElementSibling;
    const height = list.scrollHeight;
    const older = new Map();
    for (const m of frame.messages) {
      if (messages.has(m.id)) continue;
      const entry = addMessage(m);
      first ? list.insertBefore(entry.el, first) : list.append(entry.el);
      older.set(m.id, messages.get(m.id));
      messages.delete(m.id);
    }
    // The map keeps display order: older messages first (variants are listed from it).
    const shown = [...messages];
    messages.clear();
    for (const [id, entry] of [...older, ...shown]) messages.set(id, entry);
    new Set(frame.messages.filter((m) => m.reply_to).map((m) => m.reply_to))
      .forEach((userId) => showVariant(userId, variantsOf(userId).length - 1));
    for (const [id, entry] of messages) renderActions(id, entry); // which reply is the last one, again
    list.scrollTop += list.scrollHeight - height;
    showEarlier(frame.more);
  }

  // --- following the reply: the view scrolls with it until the user scrolls up -------------------
  let pinned = true;
  list.addEventListener("scroll", () => {
    pinned = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    jumpButton.hidden = pinned;
    if (list.scrollTop < 40) loadEarlier();
  });
  function followIfPinned() {
    if (pinned) list.scrollTop = list.scrollHeight;
    else jumpButton.hidden = false;
  }
  jumpButton.addEventListener("click", () => {
    pinned = true;
    list.scrollTop = list.scrollHeight;
    jumpButton.hidden = true;
  });

  // --- actions under a message ---------------------------------------------------------------------
  // Small line icons (24 x 24 paths), drawn here: no icon font to load.
  const ICONS = {
    copy: "M9 9h11v11H9z M5 15H4V4h11v1",
    regenerate: "M20 11a8 8 0 1 0-2.3 5.7 M20 4v7h-7",
    good: "M7 11v9H4v-9z M7 11l4-7c1.5 0 2.5 1 2 3l-1 3h6c1 0 2 1 1.7 2.2l-1.6 6.3c-.3 1-1 1.5-2 1.5H7",
    edit: "M4 20h4L19 9l-4-4L4 16z M14 6l4 4",
    bad: "M7 13V4H4v9z M7 13l4 7c1.5 0 2.5-1 2-3l-1-3h6c1 0 2-1 1.7-2.2l-1.6-6.3c-.3-1-1-1.5-2-1.5H7",
  };
  function icon(name) {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", ICONS[name]);
    svg.append(path);
    return svg;
  }

  function actionButton(label, text, onClick, pressed) {
    const button = document.createElement("button");
    button.type = "button";
    if (ICONS[text]) button.append(icon(text));
    else button.textContent = text;
    button.setAttribute("aria-label", label);
    button.title = label;
    if (pressed !== undefined) button.setAttribute("aria-pressed", String(pressed));
    button.addEventListener("click", onClick);
    return button;
  }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
      const was = [...button.childNodes];
      button.textContent = "Copied";
      setTimeout(() => button.replaceChildren(...was), 1500);
    } catch (error) {
      toast("Copying needs clipboard access; select the text instead.");
    }
  }

  // The replies to one user message (regenerated ones included), oldest first.
  function variantsOf(userMessageId) {
    return [...messages].filter(([, e]) => e.role === "assistant" && e.replyTo === userMessageId).map(([id]) => id);
  }

  function showVariant(userMessageId, index) {
    const ids = variantsOf(userMessageId);
    ids.forEach((id, i) => { messages.get(id).el.hidden = i !== index; });
    ids.forEach((id) => renderActions(id, messages.get(id)));
  }

  function renderActions(id, entry) {
    const box = entry.el.querySelector(".actions");
    if (!box) return;
    const buttons = [];
    if (entry.status === "streaming" || entry.status === "sending") { box.replaceChildren(); return; }
    buttons.push(actionButton(entry.role === "user" ? "Copy message" : "Copy reply", "copy", (e) => copy(entry.text, e.currentTarget)));
    if (entry.role === "user") {
      const edit = actionButton("Edit message", "edit", () => startEdit(id, entry));
      edit.disabled = !!streamingId;
      buttons.push(edit);
    }
    if (entry.role === "assistant") {
      const ids = entry.replyTo ? variantsOf(entry.replyTo) : [id];
      if (ids.length > 1) {
        const index = ids.indexOf(id);
        const previous = actionButton("Previous reply", "‹", () => showVariant(entry.replyTo, index - 1));
        previous.disabled = index === 0;
        const position = document.createElement("span");
        position.className = "variant";
        position.textContent = `${index + 1}/${ids.length}`;
        const next = actionButton("Next reply", "›", () => showVariant(entry.replyTo, index + 1));
        next.disabled = index === ids.length - 1;
        buttons.push(previous, position, next);
      }
      // Only the last exchange is regenerated: a new reply to an older message would land below later ones.
      const last = [...messages.values()].filter((e) => e.role === "assistant").pop();
      if (last && last.replyTo === entry.replyTo) {
        const failed = ["error", "interrupted", "stopped"].includes(entry.status);
        // A reply that failed or was cut off offers a plain "Retry" (the same request again).
        const regenerate = failed
          ? actionButton("Retry reply", "Retry", () => send({type: "regenerate", message_id: id}))
          : actionButton("Regenerate reply", "regenerate", () => send({type: "regenerate", message_id: id}));
        if (failed) regenerate.className = "retry";
        regenerate.disabled = !!streamingId;
        buttons.push(regenerate);
      }
      buttons.push(actionButton("Good reply", "good", () => rate(id, entry, 1), entry.feedback === 1));
      buttons.push(actionButton("Bad reply", "bad", () => rate(id, entry, -1), entry.feedback === -1));
    }
    box.replaceChildren(...buttons);
  }

  // --- editing a sent message ----------------------------------------------------------------------
  // The edited message and everything after it leave the conversation (docs/protocol.md, "Editing"),
  // and the new text is sent in their place.
  function startEdit(id, entry) {
    if (streamingId || entry.el.querySelector(".edit-form")) return;
    const form = document.createElement("form");
    form.className = "edit-form";
    const box = document.createElement("textarea");
    box.value = entry.text;
    box.rows = Math.min(8, entry.text.split("\n").length + 1);
    box.setAttribute("aria-label", "Edit message");
    const save = document.createElement("button");
    save.type = "submit";
    save.textContent = "Save and send";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "secondary";
    cancel.textContent = "Cancel";
    const note = document.createElement("small");
    note.textContent = "Messages after this one will be replaced.";
    const buttons = document.createElement("div");
    buttons.className = "edit-buttons";
    buttons.append(note, cancel, save);
    form.append(box, buttons);
    const body = entry.el.querySelector(".body");
    body.hidden = true;
    entry.el.querySelector(".actions").hidden = true;
    body.after(form);
    const close = () => {
      form.remove();
      body.hidden = false;
      entry.el.querySelector(".actions").hidden = false;
      input.focus();
    };
    cancel.addEventListener("click", close);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const content = box.value;
      if (!content.trim() || content === entry.text) { close(); return; }
      if (streamingId) { toast("Wait for the reply to finish, or stop it, before editing."); return; }
      if (cpLength(content) > maxChars) { toast(`Messages can be at most ${maxChars} characters.`); return; }
      dropFrom(id);
      submit(content, id);
      input.focus();
    });
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); form.requestSubmit(); }
      if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); close(); }
    });
    box.focus();
    box.setSelectionRange(box.value.length, box.value.length);
  }

  // Removes message ``id`` and every message shown after it (an edit replaced them).
  function dropFrom(id) {
    const first = messages.get(id);
    if (!first) return;
    for (const [messageId, entry] of [...messages]) {
      if (entry.el === first.el || first.el.compareDocumentPosition(entry.el) & Node.DOCUMENT_POSITION_FOLLOWING) {
        entry.el.remove();
        messages.delete(messageId);
      }
    }
  }

  // Thumbs up or down, then an optional comment; sending again replaces it.
  async function rate(id, entry, rating, comment = "") {
    try {
      await post(`/feedback/${encodeURIComponent(id)}/`, {rating, comment});
    } catch (error) {
      toast("Your feedback could not be saved; try again.");
      return;
    }
    entry.feedback = rating;
    renderActions(id, entry);
    if (comment) { toast("Thank you for the comment."); return; }
    entry.el.querySelector(".feedback-form")?.remove();
    const form = document.createElement("form");
    form.className = "feedback-form";
    const input = document.createElement("input");
    input.placeholder = rating > 0 ? "What was good? (optional)" : "What went wrong? (optional)";
    input.setAttribute("aria-label", "Feedback comment");
    input.maxLength = 2000;
    const submit = document.createElement("button");
    submit.type = "submit";
    submit.textContent = "Send";
    form.append(input, submit);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      form.remove();
      if (input.value.trim()) rate(id, entry, rating, input.value.trim());
    });
    entry.el.append(form);
    input.focus();
  }

  // Copy buttons of code blocks (rendered by render.js).
  list.addEventListener("click", (event) => {
    const button = event.target.closest(".copy-code");
    if (button) copy(button.closest(".code-block").querySelector("code").textContent, button);
  });

  function handle(frame) {
    switch (frame.type) {
      case "history": {
        if (frame.conversation_id !== conversationId) return;
        if (frame.before) { prependPage(frame); break; }
        useDocuments.checked = frame.use_documents !== false;
        document.getElementById("topbar-title").textContent = frame.title || "New chat";
        messages.clear();
        list.querySelectorAll(".message").forEach((el) => el.remove());
        setStreaming(null);
        frame.messages.forEach(addMessage);
        // Of several replies to one message (regenerated), the newest shows; ‹ › reach the others.
        new Set(frame.messages.filter((m) => m.reply_to).map((m) => m.reply_to))
          .forEach((userId) => showVariant(userId, variantsOf(userId).length - 1));
        for (const p of pending.values()) list.append(p.el); // still unacknowledged: keep at the end
        welcome.hidden = frame.messages.length > 0 || pending.size > 0;
        list.scrollTop = list.scrollHeight;
        showEarlier(frame.more);
        break;
      }
      case "ack": {
        const p = pending.get(frame.client_id);
        if (!conversationId) {
          conversationId = frame.conversation_id;
          history.pushState({}, "", `/c/${conversationId}/`);
          addToSidebar(conversationId, p ? p.content : "New chat");
          // The server titles a new conversation with its first message (cut to 80 characters).
          document.getElementById("topbar-title").textContent = listed[0].title;
        }
        if (p) {
          pending.delete(frame.client_id);
          // An edit resent after a reconnect: the history shown meanwhile may still hold what it replaced.
          if (p.replaces) dropFrom(p.replaces);
          const mine = {role: "user", text: p.content, status: "complete", el: p.el};
          p.el.dataset.id = frame.user_message_id;
          messages.set(frame.user_message_id, mine);
          setStatus(p.el, "complete");
          renderActions(frame.user_message_id, mine);
        }
        if (!messages.has(frame.assistant_message_id)) {
          addMessage({id: frame.assistant_message_id, role: "assistant", content: "", status: "streaming",
                      reply_to: frame.user_message_id});
        }
        followIfPinned();
        break;
      }
      case "replaced": {
        // Another tab edited a message: it and every later one are gone.
        if (frame.conversation_id === conversationId) dropFrom(frame.message_id);
        break;
      }
      case "message": {
        const m = frame.message;
        addMessage(m);
        if (m.role === "assistant" && m.reply_to) showVariant(m.reply_to, variantsOf(m.reply_to).length - 1);
        followIfPinned();
        break;
      }
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
        if (entry.el.dataset.status !== "streaming" || entry.el.querySelector(".meta").textContent) {
          setStatus(entry.el, "streaming");
        }
        if (streamingId !== frame.message_id) setStreaming(frame.message_id);
        followIfPinned();
        break;
      }
      case "done": {
        const entry = messages.get(frame.message_id);
        if (entry) {
          entry.status = frame.status;
          setStatus(entry.el, frame.status, frame.error ? frame.error.message : "");
          renderBody(entry);
          renderActions(frame.message_id, entry);
          announce(frame.status === "complete" ? "Reply finished." : `Reply ${frame.status}.`);
        }
        if (streamingId === frame.message_id) setStreaming(null);
        break;
      }
      case "error": {
        const p = frame.client_id && pending.get(frame.client_id);
        if (p && p.replaces) {
          // The edit was refused: the messages it would have replaced are still there. Show them again.
          pending.delete(frame.client_id);
          p.el.remove();
          toast(`Your edit was not sent: ${frame.message}`);
          send({type: "open", conversation_id: conversationId});
        } else if (p) {
          pending.delete(frame.client_id);
          refused(frame, p);
        } else if (frame.code === "out_of_sync" && frame.conversation_id === conversationId) {
          send({type: "open", conversation_id: conversationId}); // re-sync, as on a gap
        } else if (frame.code === "rate_limited" && frame.conversation_id && frame.retry_after) {
          // A refused `open`: asked again when the limit allows (an earlier page, or the conversation).
          if (loadingEarlier) showEarlier(true);
          else setTimeout(() => { if (frame.conversation_id === conversationId) send({type: "open", conversation_id: conversationId}); }, frame.retry_after * 1000);
        } else {
          if (loadingEarlier) showEarlier(true);
          toast(frame.message);
        }
        break;
      }
      case "conversation": {
        // Titled by the model, renamed or deleted in another tab (or this one): the list and the title follow.
        const c = frame.conversation;
        listChanged++;
        if (frame.deleted) {
          listed = listed.filter((x) => x.id !== c.id);
          if (c.id === conversationId) { location.href = "/"; return; }
        } else if (!listed.some((x) => x.id === c.id)) {
          // Started in another tab (and now titled): it joins the list, unless a search hides it.
          if (!searchBox.value.trim()) listed = [c, ...listed];
        } else {
          listed = listed.map((x) => (x.id === c.id ? {...x, title: c.title} : x));
        }
        if (!frame.deleted && c.id === conversationId) document.getElementById("topbar-title").textContent = c.title;
        renderSidebar();
        break;
      }
      case "document": {
        // An upload finished ingesting while the user chats (documents page: /documents/).
        if (frame.stage === "ready") toast(`“${frame.document.title}” is ready: answers can use it now.`);
        if (frame.stage === "failed") {
          const kept = frame.document.live ? " The previous version is still used." : "";
          toast(`“${frame.document.title}” could not be ingested: ${frame.document.error}${kept}`);
        }
        break;
      }
    }
  }

  // --- the sidebar: newest first, grouped by day, searched and paged on the server --------------
  const nav = document.getElementById("conversation-list");
  const searchBox = document.getElementById("conversation-search");
  const moreButton = document.getElementById("more-conversations");
  let listed = []; // {id, title, updated_at}
  let nextCursor = null;
  let listChanged = 0; // bumped by changes made here while a page of the list may be on its way

  function dayGroup(iso) {
    const day = new Date(iso);
    const today = new Date();
    today.setHours(0, 0, 0, 0);
    const days = (today - new Date(day.getFullYear(), day.getMonth(), day.getDate())) / 86400000;
    if (days <= 0) return "Today";
    if (days <= 1) return "Yesterday";
    if (days <= 7) return "Previous 7 days";
    return "Older";
  }

  function renderSidebar() {
    const items = [];
    let group = null;
    for (const c of listed) {
      const label = dayGroup(c.updated_at);
      if (label !== group) {
        group = label;
        const heading = document.createElement("h2");
        heading.className = "day";
        heading.textContent = label;
        items.push(heading);
      }
      items.push(sidebarItem(c));
    }
    if (!listed.length) {
      const empty = document.createElement("p");
      empty.className = "empty";
      empty.id = "no-conversations";
      empty.textContent = searchBox.value.trim() ? "No conversation matches." : "No conversations yet.";
      items.push(empty);
    }
    nav.replaceChildren(...items);
    moreButton.hidden = !nextCursor;
  }

  function sidebarItem(c) {
    const row = document.createElement("div");
    row.className = "conversation" + (c.id === conversationId ? " active" : "");
    row.dataset.id = c.id;
    const a = document.createElement("a");
    a.href = `/c/${c.id}/`;
    a.textContent = c.title || "Untitled";
    if (c.id === conversationId) a.setAttribute("aria-current", "page");
    const rename = document.createElement("button");
    rename.type = "button";
    rename.className = "link row-action";
    rename.textContent = "✎";
    rename.setAttribute("aria-label", `Rename ${c.title || "Untitled"}`);
    rename.addEventListener("click", () => startRename(c, row));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "link row-action";
    remove.textContent = "✕";
    remove.setAttribute("aria-label", `Delete ${c.title || "Untitled"}`);
    remove.addEventListener("click", () => removeConversation(c));
    row.append(a, rename, remove);
    return row;
  }

  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-CSRFToken": csrf},
      body: JSON.stringify(body || {}),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.error || "The server refused; try again.");
    return data;
  }

  function startRename(c, row) {
    const input = document.createElement("input");
    input.className = "rename";
    input.value = c.title;
    input.maxLength = 200;
    input.setAttribute("aria-label", "New title");
    row.replaceChildren(input);
    input.focus();
    input.select();
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      if (save && input.value.trim() && input.value.trim() !== c.title) {
        try {
          const saved = await post(`/conversations/${c.id}/rename/`, {title: input.value});
          c.title = saved.title;
          if (c.id === conversationId) document.getElementById("topbar-title").textContent = saved.title;
        } catch (error) { toast(error.message); }
      }
      renderSidebar();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); finish(true); }
      if (event.key === "Escape") { event.preventDefault(); finish(false); }
    });
    input.addEventListener("blur", () => finish(true));
  }

  async function removeConversation(c) {
    if (!confirm(`Delete “${c.title || "Untitled"}” and all its messages? This cannot be undone.`)) return;
    try {
      await post(`/conversations/${c.id}/delete/`);
    } catch (error) { toast(error.message); return; }
    listed = listed.filter((x) => x.id !== c.id);
    renderSidebar();
    if (c.id === conversationId) location.href = "/";
  }

  async function loadConversations(more) {
    const changed = listChanged;
    const params = new URLSearchParams();
    if (searchBox.value.trim()) params.set("q", searchBox.value.trim());
    if (more && nextCursor) params.set("before", nextCursor);
    const response = await fetch(`/conversations/?${params}`, {headers: {Accept: "application/json"}});
    if (!response.ok) return;
    const data = await response.json();
    // A conversation started (or renamed) while this page was on its way: ask again, it is in the new one.
    if (!more && changed !== listChanged) { loadConversations(false); return; }
    listed = more ? listed.concat(data.conversations) : data.conversations;
    nextCursor = data.next;
    renderSidebar();
  }

  let searchTimer = null;
  searchBox.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => loadConversations(false), 250);
  });
  moreButton.addEventListener("click", () => loadConversations(true));
  // Near the end of the list: the next page.
  nav.addEventListener("scroll", () => {
    if (nextCursor && nav.scrollTop + nav.clientHeight > nav.scrollHeight - 40) loadConversations(true);
  });

  function addToSidebar(id, title) {
    listChanged++;
    listed = [{id, title: title.slice(0, 80), updated_at: new Date().toISOString()}, ...listed.filter((c) => c.id !== id)];
    renderSidebar();
  }

  // Screen readers hear when a reply ends (the list itself announces new messages).
  function announce(text) {
    let region = document.getElementById("announcer");
    if (!region) {
      region = document.createElement("div");
      region.id = "announcer";
      region.className = "visually-hidden";
      region.setAttribute("aria-live", "polite");
      document.body.append(region);
    }
    region.textContent = text;
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
    input.value = "";
    submit(content, null);
  });

  // A message the server did not take. Waiting helps (too many replies at once, a busy conversation, a
  // server error): a Retry button sends it again, with the same client_id (safe: docs/protocol.md),
  // once ``retry_after`` has passed. Otherwise (too long, the conversation limit) the text goes back
  // to the composer to be changed.
  function refused(frame, p) {
    setStatus(p.el, "error", frame.message);
    const waiting = ["busy", "internal_error"].includes(frame.code) ||
      (frame.code === "rate_limited" && frame.retry_after != null);
    if (!waiting) {
      input.value = p.content;
      return;
    }
    const retry = actionButton("Retry sending", "Retry", () => {
      retry.remove();
      pending.set(frame.client_id, p);
      setStatus(p.el, "sending");
      sendPending(frame.client_id, p);
    });
    retry.className = "retry";
    if (frame.retry_after) {
      retry.disabled = true;
      setTimeout(() => { retry.disabled = false; }, frame.retry_after * 1000);
    }
    p.el.querySelector(".actions").replaceChildren(retry);
  }

  // Sends a user message (an edit when ``replaces`` is the id of the message it replaces).
  function submit(content, replaces) {
    const clientId = uuid();
    const p = {content, useDocuments: useDocuments.checked, replaces, el: bubble("user", content, "sending")};
    pending.set(clientId, p);
    pinned = true;
    followIfPinned();
    sendPending(clientId, p);
  }

  // The `send` frame of a message waiting in `pending` (sent again as it is until acknowledged).
  function sendPending(clientId, p) {
    send({type: "send", conversation_id: conversationId, client_id: clientId, content: p.content,
          use_documents: p.useDocuments, replaces: p.replaces || undefined});
  }
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      document.getElementById("composer").requestSubmit();
    }
    // Up in an empty composer edits the last message sent, as in most chat apps.
    if (event.key === "ArrowUp" && !input.value && !streamingId) {
      const last = [...messages].filter(([, e]) => e.role === "user").pop();
      if (last) { event.preventDefault(); startEdit(last[0], last[1]); }
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && streamingId && !passageDialog.open) stopButton.click();
  });
  stopButton.addEventListener("click", () => {
    if (!streamingId) return;
    const id = streamingId;
    const entry = messages.get(id);
    if (entry) setStatus(entry.el, "streaming", "Stopping…");
    send({type: "stop", message_id: id});
  });

  // --- the drawer (narrow screens) and the theme -------------------------------------------------
  const menu = document.getElementById("menu");
  const sidebar = document.getElementById("sidebar");
  const scrim = document.getElementById("scrim");
  function drawer(open) {
    sidebar.classList.toggle("open", open);
    scrim.hidden = !open;
    menu.setAttribute("aria-expanded", String(open));
    if (open) sidebar.querySelector("a, button")?.focus();
  }
  menu.addEventListener("click", () => drawer(!sidebar.classList.contains("open")));
  scrim.addEventListener("click", () => drawer(false));
  sidebar.addEventListener("keydown", (event) => { if (event.key === "Escape") { drawer(false); menu.focus(); } });

  const themeButton = document.getElementById("theme");
  function applyTheme(theme) {
    document.documentElement.dataset.theme = theme;
    themeButton.setAttribute("aria-pressed", String(theme === "dark"));
    document.getElementById("code-light").media = theme === "dark" ? "not all" : "all";
    document.getElementById("code-dark").media = theme === "dark" ? "all" : "not all";
  }
  applyTheme(document.documentElement.dataset.theme);
  themeButton.addEventListener("click", () => {
    const theme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem("theme", theme);
    applyTheme(theme);
  });

  loadConversations(false);
  connect();
})();
