// The labelling page's keyboard shortcuts and its time-on-item measure. The page works without this file: every
// action is a plain form, and without it the server times the item from when it rendered the page.
(function () {
  "use strict";
  var started = Date.now();
  var CHOICE_KEYS = {"1": "left", "a": "left", "2": "right", "b": "right", "3": "tie", "t": "tie",
                     "4": "both_bad", "x": "both_bad"};
  var sent = false;

  var form = document.getElementById("vote-form");
  if (form) {
    form.addEventListener("submit", function (event) {
      if (sent) {  // a second key press before the page changes would only meet "already voted"
        event.preventDefault();
        return;
      }
      sent = true;
      var seconds = document.getElementById("seconds");
      if (seconds) {
        seconds.value = ((Date.now() - started) / 1000).toFixed(3);
      }
    });
  }

  function typing(target) {
    if (!target) {
      return false;
    }
    var tag = target.tagName;
    return tag === "TEXTAREA" || tag === "SELECT" || target.isContentEditable ||
      (tag === "INPUT" && target.type !== "radio" && target.type !== "checkbox");
  }

  function press(selector) {
    var element = document.querySelector(selector);
    if (!element) {
      return false;
    }
    element.click();
    return true;
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing || typing(event.target)) {
      return;
    }
    var key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    var done = false;
    if (CHOICE_KEYS.hasOwnProperty(key)) {
      done = press('#vote-form button[name="choice"][value="' + CHOICE_KEYS[key] + '"]');
    } else if (key === "s") {
      done = press("#skip");
    } else if (key === "u") {
      done = press("#undo");
    } else if (key === "n" || (key === "Enter" && !/^(BUTTON|A)$/.test(event.target.tagName))) {
      done = press("#next");
    }
    if (done) {
      event.preventDefault();
    }
  });
})();
