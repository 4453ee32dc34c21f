// The theme before the first paint (no flash): the user's choice, else the system's. Loaded by a
// blocking <script> in <head> (the Content-Security-Policy allows no inline script).
document.documentElement.dataset.theme = localStorage.getItem("theme") ||
  (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
