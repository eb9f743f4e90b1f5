// Keys 1-4 choose A / B / tie / both bad, "u" undoes the last choice; typing a reason is never taken as a choice.
// A form is submitted once: later clicks and keys are ignored until the next page (the server also stores a
// repeated choice only once).
(function () {
  "use strict";
  var sent = false;
  document.querySelectorAll("form").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (sent) { event.preventDefault(); return; }
      sent = true;
    });
  });
  document.addEventListener("keydown", function (event) {
    var target = event.target;
    if (target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT")) { return; }
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var button = document.querySelector('button[data-key="' + event.key + '"]');
    if (button && !button.disabled) {
      event.preventDefault();
      button.click();
    }
  });
})();
