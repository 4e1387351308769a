// Opened from disk (file://), the browser refuses the fetch() that Sphinx's search uses to show a summary under each
// result; the results themselves come from searchindex.js and work. Skip the summaries there, keep them when served.
if (window.location.protocol === "file:" && typeof DOCUMENTATION_OPTIONS !== "undefined") {
  DOCUMENTATION_OPTIONS.SHOW_SEARCH_SUMMARY = false;
}
