/* The landlord page's own script: follows a card capture by server-sent events.
   Served from the page itself (the CSP allows no inline script). */
(function () {
  "use strict";

  function follow(panel) {
    var url = panel.getAttribute("data-events");
    if (!url || !window.EventSource) { return; }
    var source = new EventSource(url);
    source.addEventListener("capture", function (event) {
      source.close();
      var data = JSON.parse(event.data);
      var box = document.createElement("div");
      box.innerHTML = data.html; /* rendered and escaped by the server's templates */
      var fresh = box.querySelector("#capture");
      if (fresh) { panel.replaceWith(fresh); }
      var fields = document.getElementById("enroll-fields");
      if (fields) { fields.disabled = !data.enable; }
      var form = document.getElementById("enroll-form");
      if (form) { form.hidden = !data.enable; }
      document.body.setAttribute("data-capture", data.state);
      var steps = document.querySelectorAll(".steps li");
      if (data.enable && steps.length === 3) {
        steps[1].removeAttribute("aria-current");
        steps[2].setAttribute("aria-current", "step");
      }
      if (window.htmx && fresh) { window.htmx.process(fresh); }
    });
    source.onerror = function () {
      /* Closed for good (signed out, capture gone): reload shows why. A dropped
         connection is retried by the browser itself. */
      if (source.readyState === EventSource.CLOSED) { window.location.reload(); }
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    var panel = document.querySelector("[data-events]");
    if (panel) { follow(panel); }
  });
})();
