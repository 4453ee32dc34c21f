// The documents page: drag-and-drop upload, and each document's ingestion progress, live over the chat socket.
(() => {
  const page = document.getElementById("documents-page");
  const list = document.querySelector("#document-list tbody");
  const input = document.getElementById("file-input");
  const zone = document.getElementById("dropzone");
  const errorBox = document.getElementById("upload-error");
  const empty = document.getElementById("no-documents");
  const maxBytes = Number(page.dataset.maxBytes);
  const maxFiles = Number(page.dataset.maxFiles);
  const csrf = document.querySelector("[name=csrfmiddlewaretoken]").value;
  const LABELS = { queued: "Queued", processing: "Processing", parsed: "Parsed", embedding: "Embedding", ready: "Ready", failed: "Failed" };

  function mb(bytes) { return `${(bytes / 1e6).toFixed(1)} MB`; }

  function row(id) {
    let tr = list.querySelector(`tr[data-id="${id}"]`);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.id = id;
      tr.innerHTML = `<td class="title"><span></span><small></small></td>
        <td class="status"><span class="badge"></span><small class="reason" hidden></small><small class="note" hidden></small><progress hidden></progress></td>
        <td class="chunks">0</td>
        <td><form method="post"><input type="hidden" name="csrfmiddlewaretoken"><button class="link danger" type="submit">Delete</button></form></td>`;
      tr.querySelector("form").action = `${location.pathname.replace(/\/$/, "")}/${id}/delete/`;
      tr.querySelector("[name=csrfmiddlewaretoken]").value = csrf;
      list.prepend(tr);
      empty.hidden = true;
    }
    return tr;
  }

  // One shape for upload answers and socket frames: {document: {...}, stage, done, total}.
  function show(frame) {
    const doc = frame.document;
    const tr = row(doc.id);
    tr.dataset.status = doc.status;
    tr.querySelector(".title span").textContent = doc.title;
    tr.querySelector("button").setAttribute("aria-label", `Delete ${doc.title}`);
    tr.toggleAttribute("data-live", Boolean(doc.live));
    const stage = frame.stage || doc.status;
    // A new version that failed over a live one: the live one is still searched, as it was.
    const failedOver = doc.live && doc.status === "failed";
    tr.querySelector(".badge").textContent = frame.unchanged ? "Unchanged" : failedOver ? "New version failed" : (LABELS[stage] || stage);
    const reason = tr.querySelector(".reason");
    reason.hidden = !doc.error;
    reason.textContent = failedOver ? `The new version failed: ${doc.error} The previous version is still used.` : (doc.error || "");
    const note = tr.querySelector(".note");
    note.hidden = !(doc.live && (doc.status === "queued" || doc.status === "processing"));
    note.textContent = "The previous version is used until this one is ready.";
    const stale = tr.querySelector(".stale");
    if (stale && stage === "ready") stale.hidden = true; // stored now by the configured model
    tr.querySelector(".chunks").textContent = doc.chunk_count;
    const bar = tr.querySelector("progress");
    bar.hidden = stage !== "embedding";
    if (stage === "embedding" && frame.total) { bar.max = frame.total; bar.value = frame.done; bar.textContent = `${frame.done}/${frame.total}`; }
  }

  function refuse(file, reason) {
    const doc = { id: `local-${Math.random().toString(36).slice(2)}`, title: file.name, status: "failed", chunk_count: 0, error: reason };
    show({ document: doc, stage: "failed" });
    const tr = row(doc.id);
    tr.querySelector("form").remove();
  }

  async function upload(files) {
    errorBox.hidden = true;
    const accepted = [];
    for (const file of files) {
      if (file.size > maxBytes) refuse(file, `The file is ${mb(file.size)}; the limit is ${mb(maxBytes)}.`);
      else accepted.push(file);
    }
    // One request carries at most maxFiles files and maxBytes of them (the server refuses a bigger body).
    const batches = [];
    for (const file of accepted) {
      const last = batches[batches.length - 1];
      if (last && last.length < maxFiles && last.reduce((sum, f) => sum + f.size, 0) + file.size <= maxBytes) last.push(file);
      else batches.push([file]);
    }
    for (const batch of batches) {
      const body = new FormData();
      batch.forEach((file) => body.append("files", file));
      let refused = false;
      try {
        const response = await fetch(page.dataset.uploadUrl, { method: "POST", body, headers: { "X-CSRFToken": csrf } });
        refused = response.status === 429;
        const answer = await response.json().catch(() => ({}));
        // Over the upload quota (429), the files before the refused one were stored: listed too.
        (answer.documents || []).forEach((frame, j) => {
          show(frame);
          const file = batch[j];
          row(frame.document.id).querySelector(".title small").textContent = `${file.name} · ${mb(file.size)}`;
        });
        if (!response.ok) throw new Error(answer.error || `The upload failed (HTTP ${response.status}).`);
      } catch (error) {
        errorBox.textContent = error.message || "The upload failed: check your connection and try again.";
        errorBox.hidden = false;
        if (refused) break; // over the upload quota: the next groups would be refused too
      }
    }
  }

  input.addEventListener("change", () => { upload([...input.files]); input.value = ""; });
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (e) => { e.preventDefault(); upload([...e.dataTransfer.files]); });

  // Progress frames arrive on the chat socket; this page opens one just to listen.
  let retry = 500;
  function listen() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/chat/`);
    socket.onopen = () => { retry = 500; };
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "document") show(frame);
    };
    socket.onclose = (event) => {
      if (event.code === 4401) { location.href = `/accounts/login/?session=ended&next=${encodeURIComponent(location.pathname)}`; return; }
      setTimeout(listen, retry);
      retry = Math.min(retry * 2, 10000);
    };
  }
  listen();
})();
