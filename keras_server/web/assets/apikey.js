// The API key, for a server started with --api-keys. The page learns that a
// key is needed from the API itself: a 401 shows the key form, and the file
// that was refused is sent again once a key is given. The key stays in this
// page's memory only (never in storage, never in a URL) and goes out as
// `Authorization: Bearer <key>`, to this origin only.
"use strict";

window.apiKey = (() => {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const hint = document.getElementById("key-hint");
  let key = "";
  let retry = null;

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    key = input.value.trim();
    if (!key) return;
    form.hidden = true;
    if (retry) retry();
  });

  return {
    // Headers for a request to the API.
    headers() {
      return key ? { Authorization: `Bearer ${key}` } : {};
    },
    // The server refused the request (401): ask for a key, then call `again`.
    ask(again) {
      retry = again;
      hint.textContent = key
        ? "That API key was not accepted. Enter another one."
        : "This server needs an API key.";
      key = "";
      form.hidden = false;
      input.select();
      input.focus();
    },
  };
})();
