// fpe-node console: the pages work without JavaScript (plain forms carrying csrf_token);
// this only asks before destructive actions and refreshes pages marked data-refresh-s.
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });
  var seconds = parseInt(document.body.getAttribute("data-refresh-s") || "0", 10);
  if (seconds > 0) {
    window.setTimeout(function () {
      // Not while the user is typing in a form.
      var active = document.activeElement;
      if (!active || !active.form) {
        window.location.reload();
      }
    }, seconds * 1000);
  }
})();
