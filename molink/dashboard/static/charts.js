// Small line charts on canvas: a few series over the last minutes, sharing one time axis.

const WINDOW_S = 300;
const PAD = { left: 52, right: 10, top: 10, bottom: 22 };

export class LineChart {
  // series: [{key, label, color}] naming fields of the history points.
  constructor(canvas, series, format = (v) => v.toFixed(1)) {
    this.canvas = canvas;
    this.series = series;
    this.format = format;
    this.points = [];
  }

  add(points) {
    // A reconnected stream starts over with the whole history: keep only what is new.
    const last = this.points.length ? this.points[this.points.length - 1].t : -Infinity;
    this.points.push(...points.filter((p) => p.t > last));
    const newest = this.points.length ? this.points[this.points.length - 1].t : 0;
    this.points = this.points.filter((p) => p.t > newest - WINDOW_S);
    // How many points have a value: tests and people can read it off the element.
    const counted = this.points.filter((p) => this.series.some((s) => p[s.key] !== null));
    this.canvas.dataset.points = String(counted.length);
    this.draw();
  }

  draw() {
    const ratio = window.devicePixelRatio || 1;
    const width = this.canvas.clientWidth || 300;
    const height = this.canvas.clientHeight || 150;
    this.canvas.width = width * ratio;
    this.canvas.height = height * ratio;
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const values = this.points.flatMap((p) => this.series.map((s) => p[s.key]));
    const present = values.filter((v) => v !== null && Number.isFinite(v));
    const peak = Math.max(...present, 0) || 1;
    const top = peak * 1.15;
    const newest = this.points.length ? this.points[this.points.length - 1].t : Date.now() / 1000;
    const x = (t) => PAD.left + ((t - (newest - WINDOW_S)) / WINDOW_S) * (width - PAD.left - PAD.right);
    const y = (v) => height - PAD.bottom - (v / top) * (height - PAD.top - PAD.bottom);
    this.drawAxes(ctx, width, height, peak, y);
    for (const s of this.series) {
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let drawing = false;
      for (const p of this.points) {
        const v = p[s.key];
        if (v === null || !Number.isFinite(v)) { drawing = false; continue; }
        if (drawing) ctx.lineTo(x(p.t), y(v)); else ctx.moveTo(x(p.t), y(v));
        drawing = true;
      }
      ctx.stroke();
    }
  }

  drawAxes(ctx, width, height, peak, y) {
    ctx.strokeStyle = "#d0d4da";
    ctx.fillStyle = "#5b6470";
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    for (const fraction of [0, 0.5, 1]) {
      const value = peak * fraction;
      ctx.beginPath();
      ctx.moveTo(PAD.left, y(value));
      ctx.lineTo(width - PAD.right, y(value));
      ctx.stroke();
      ctx.fillText(this.format(value), 4, y(value) + 4);
    }
    ctx.fillText(`last ${WINDOW_S / 60} min`, PAD.left, height - 6);
    ctx.fillText("now", width - PAD.right - 22, height - 6);
  }
}
