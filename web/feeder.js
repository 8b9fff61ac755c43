// Speak mode's text feeder: hands the text to the gateway as an LLM would, in deltas at a
// given number of characters per second, so speech visibly starts before the text is
// complete.

const EVERY_MS = 30;

export class TextFeeder {
  // `cps()`: the speed now (the slider may move while it feeds); `onDelta(text)` for each
  // delta, `onEnd()` once after the last.
  constructor(text, { cps, onDelta, onEnd }) {
    this.chars = Array.from(text); // whole code points: never split a surrogate pair
    this.cps = cps;
    this.onDelta = onDelta;
    this.onEnd = onEnd;
    this.i = 0;
    this.budget = 1; // the first characters go out at once
    this.last = performance.now();
    this.timer = setInterval(() => this.tick(), EVERY_MS);
    this.tick();
  }

  get running() {
    return this.timer !== null;
  }

  tick() {
    const now = performance.now();
    this.budget += ((now - this.last) / 1000) * this.cps();
    this.last = now;
    const n = Math.min(this.chars.length - this.i, Math.max(1, Math.floor(this.budget)));
    if (n <= 0 || this.budget < 1) return;
    this.budget -= n;
    const delta = this.chars.slice(this.i, this.i + n).join("");
    this.i += n;
    this.onDelta(delta);
    if (this.i >= this.chars.length) {
      this.stop();
      this.onEnd();
    }
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }
}
