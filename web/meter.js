// The level meter: a bar per 33 ms of what the speakers get, drawn on a canvas. Every frame
// drawn costs the same CPU cores that, on a small device, also run the audio, so it draws
// at most 30 times a second and not at all once it has decayed to silence.

const BARS = 48;
const EVERY_MS = 33;

export class Meter {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.levels = new Array(BARS).fill(0);
    this.lastDraw = 0;
    this.silent = false; // the bars are all drawn at zero
    // A resized canvas is cleared: draw the (silent) bars again.
    window.addEventListener("resize", () => {
      this.silent = false;
    });
  }

  // Called every animation frame; `readLevel()` gives the output level now (RMS, 0..1),
  // read only when a frame is due.
  tick(now, readLevel) {
    if (now - this.lastDraw < EVERY_MS) return;
    this.lastDraw = now;
    const level = readLevel();
    if (level > 0 || !this.silent) this.draw(level);
    this.silent = level === 0 && this.levels.every((v) => v === 0);
  }

  draw(level) {
    const levels = this.levels;
    levels.push(Math.min(1, Math.sqrt(level) * 1.6)); // sqrt: speech levels are mostly low
    levels.shift();
    const meter = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = meter.clientWidth;
    const h = meter.clientHeight;
    if (meter.width !== Math.round(w * dpr)) {
      meter.width = Math.round(w * dpr);
      meter.height = Math.round(h * dpr);
    }
    const c = this.ctx;
    c.setTransform(dpr, 0, 0, dpr, 0, 0);
    c.clearRect(0, 0, w, h);
    const gap = 2;
    const bw = Math.max(1, (w - gap * (levels.length - 1)) / levels.length);
    const grad = c.createLinearGradient(0, 0, w, 0);
    grad.addColorStop(0, "#8b5cf6");
    grad.addColorStop(1, "#22d3ee");
    c.fillStyle = grad;
    for (let i = 0; i < levels.length; i++) {
      const bh = Math.max(2, levels[i] * (h - 4));
      const x = i * (bw + gap);
      c.globalAlpha = 0.35 + 0.65 * (i / levels.length);
      c.beginPath();
      c.roundRect(x, (h - bh) / 2, bw, bh, Math.min(2, bw / 2));
      c.fill();
    }
    c.globalAlpha = 1;
  }
}
