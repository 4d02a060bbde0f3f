// The llmswarm chat page: talks to the gateway's OpenAI-compatible API, streams answers
// (server-sent events over fetch), and shows which servers (spans of blocks) answered.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    messages: $("messages"), empty: $("empty"), composer: $("composer"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), temperature: $("temperature"), temperatureRange: $("temperature-range"),
    maxTokens: $("max-tokens"), apiKey: $("api-key"), newChat: $("new-chat"),
    statusDot: $("status-dot"), statusText: $("status-text"),
  };
  const history = [];   // {role, content} of finished turns: the conversation sent with each request
  let model = null;     // the swarm's model name, from /v1/models
  let controller = null; // aborts the answer being streamed

  els.apiKey.value = localStorage.getItem("llmswarm-api-key") || "";

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  function setStatus(text, state) {
    els.statusText.textContent = text;
    els.statusDot.className = `dot ${state || ""}`;
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      const body = await response.json();
      if (!response.ok) {
        model = null;
        setStatus(response.status === 401 ? "API key needed" : (body.error && body.error.message) || response.statusText, "bad");
        return;
      }
      model = body.data[0].id;
      setStatus(model, "ok");
    } catch (error) {
      setStatus(`gateway unreachable: ${error}`, "bad");
    }
  }

  function addMessage(role, text) {
    els.empty.hidden = true;
    const box = document.createElement("div");
    box.className = `message ${role}`;
    box.dataset.testid = role;
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role === "user" ? "you" : role === "assistant" ? "swarm" : "error";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    box.append(label, body);
    els.messages.append(box);
    box.scrollIntoView({ block: "end" });
    return { box, body };
  }

  function showChain(box, chain, usage, stopped) {
    const note = document.createElement("div");
    note.className = "spans";
    note.dataset.testid = "spans";
    const lead = document.createElement("span");
    lead.textContent = stopped ? "stopped · answered so far by" : "answered by";
    note.append(lead);
    (chain || []).forEach((hop, i) => {
      if (i > 0) {
        const arrow = document.createElement("span");
        arrow.className = "arrow";
        arrow.textContent = "→";
        note.append(arrow);
      }
      const span = document.createElement("span");
      span.className = "hop";
      span.textContent = `${hop.server} [${hop.start}, ${hop.end})`;
      note.append(span);
    });
    if (!chain || !chain.length) lead.textContent = stopped ? "stopped" : "answered by the swarm";
    if (usage) {
      const count = document.createElement("span");
      count.textContent = `· ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`;
      note.append(count);
    }
    box.append(note);
  }

  function busy(on) {
    els.send.disabled = on;
    els.stop.hidden = !on;
    els.prompt.disabled = on;
  }

  // Reads "data: ..." events from a fetch body; calls onEvent with each parsed JSON payload.
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onEvent(JSON.parse(data));
        }
      }
    }
  }

  async function ask(text) {
    if (!model) await loadModel();
    if (!model) {
      addMessage("error", `cannot send: ${els.statusText.textContent}`);
      return;
    }
    history.push({ role: "user", content: text });
    addMessage("user", text);
    const { box, body } = addMessage("assistant", "");
    box.classList.add("streaming");
    busy(true);
    controller = new AbortController();
    let answer = "";
    let chain = null;
    let usage = null;
    let stopped = false;
    const request = {
      model, messages: history.slice(), stream: true, stream_options: { include_usage: true },
      temperature: Number(els.temperature.value), max_tokens: Number(els.maxTokens.value),
    };
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
      });
      if (!response.ok) {
        const error = await response.json().catch(() => ({}));
        throw new Error((error.error && error.error.message) || `${response.status} ${response.statusText}`);
      }
      await readEvents(response, (event) => {
        if (event.error) throw new Error(event.error.message);
        if (event.llmswarm) chain = event.llmswarm.chain;
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            body.textContent = answer;
            box.scrollIntoView({ block: "end" });
          }
        }
      });
    } catch (error) {
      if (error.name === "AbortError") {
        stopped = true;
      } else {
        box.classList.add("error");
        body.textContent = answer ? `${answer}\n\n[error: ${error.message}]` : `error: ${error.message}`;
      }
    } finally {
      controller = null;
      box.classList.remove("streaming");
      box.dataset.done = "true";
      busy(false);
      els.prompt.focus();
    }
    if (!box.classList.contains("error")) {
      history.push({ role: "assistant", content: answer });
      showChain(box, chain, usage, stopped);
    } else {
      history.pop();
    }
  }

  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.prompt.value.trim();
    if (!text || controller) return;
    els.prompt.value = "";
    ask(text);
  });
  els.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      els.composer.requestSubmit();
    }
  });
  els.stop.addEventListener("click", () => controller && controller.abort());
  els.temperature.addEventListener("input", () => { els.temperatureRange.value = els.temperature.value; });
  els.temperatureRange.addEventListener("input", () => { els.temperature.value = els.temperatureRange.value; });
  els.apiKey.addEventListener("change", () => {
    localStorage.setItem("llmswarm-api-key", els.apiKey.value.trim());
    loadModel();
  });
  els.newChat.addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    els.messages.querySelectorAll(".message").forEach((node) => node.remove());
    els.empty.hidden = false;
    els.prompt.focus();
  });

  loadModel();
  els.prompt.focus();
})();
