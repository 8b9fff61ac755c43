// The page's chrome: element lookup, toasts, the Speak/Chat tabs, the connection pill and
// the access-key panel. No session state lives here.

export const $ = (id) => document.getElementById(id);

const STATE_TEXT = {
  idle: "Idle",
  connecting: "Connecting…",
  reconnecting: "Reconnecting…",
  connected: "Connected",
  offline: "Offline",
  busy: "Busy",
  "needs-key": "Access key needed",
};

export function toast(text, kind = "error") {
  const el = document.createElement("div");
  el.className = `toast ${kind}`;
  el.textContent = text;
  $("toasts").appendChild(el);
  setTimeout(() => el.remove(), 6000);
}

export function selectedTab() {
  return $("tab-chat").getAttribute("aria-selected") === "true" ? "chat" : "speak";
}

export function selectTab(name) {
  for (const t of ["speak", "chat"]) {
    const on = t === name;
    const tab = $(`tab-${t}`);
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`panel-${t}`).hidden = !on;
  }
  $(name === "chat" ? "chat-text" : "speak-text").focus();
}

// `chatEnabled()`: whether the Chat tab may be chosen now.
export function wireTabs(chatEnabled) {
  for (const t of ["speak", "chat"]) $(`tab-${t}`).addEventListener("click", () => selectTab(t));
  // Arrow keys move between tabs, as the WAI-ARIA tabs pattern expects.
  document.querySelector("[role=tablist]").addEventListener("keydown", (ev) => {
    if (ev.key !== "ArrowLeft" && ev.key !== "ArrowRight") return;
    const next = selectedTab() === "speak" ? "chat" : "speak";
    if (next === "chat" && !chatEnabled()) return;
    selectTab(next);
    $(`tab-${next}`).focus();
  });
}

export function showKeyPanel(show) {
  $("key-panel").hidden = !show;
  $("key-toggle").setAttribute("aria-expanded", String(show));
}

// `connect(token)`: try again with the key the user entered.
export function wireKeyPanel(connect) {
  $("key-toggle").addEventListener("click", () => {
    showKeyPanel($("key-panel").hidden);
    if (!$("key-panel").hidden) $("token").focus();
  });
  $("key-panel").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    // Session storage: the key lives as long as the tab, never on disk.
    sessionStorage.setItem("voicegw.token", token);
    connect(token);
  });
}

// The connection pill (and, when a key is needed, the key panel).
export function renderConnection(client, state, detail) {
  const pill = $("conn");
  pill.dataset.state = state;
  if (state === "connected" && client.rttMs !== null) {
    pill.title = `Session ${client.ready?.session_id || ""} · round trip ${Math.round(client.rttMs)} ms`;
  } else {
    pill.title = detail || "";
  }
  $("conn-text").textContent = STATE_TEXT[state] || state;
  if (state === "needs-key") {
    showKeyPanel(true);
    $("key-hint").textContent = detail || "This gateway requires an access key.";
    $("token").focus();
  }
}
