// The inpaint mask, painted over the image with a mouse, a finger or a pen (pointer events
// cover all three). The canvas has the image's own size, so the mask sent matches it pixel for
// pixel; CSS scales both to the screen, and the brush is sized in screen pixels.

export class MaskPainter {
  constructor(canvas, brushInput) {
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d');
    this.brushInput = brushInput;
    this.painted = false;
    this.last = null;
    this.onchange = () => {};
    canvas.addEventListener('pointerdown', (e) => this.down(e));
    canvas.addEventListener('pointermove', (e) => this.move(e));
    for (const name of ['pointerup', 'pointercancel', 'lostpointercapture']) {
      canvas.addEventListener(name, () => {
        this.last = null;
      });
    }
  }

  // A new image: the mask starts empty, at the image's size.
  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
    this.onchange();
  }

  // Image pixels per screen pixel, for the brush and the pointer's position.
  scale() {
    const box = this.canvas.getBoundingClientRect();
    return box.width ? this.canvas.width / box.width : 1;
  }

  point(e) {
    const box = this.canvas.getBoundingClientRect();
    const scale = this.scale();
    return { x: (e.clientX - box.left) * scale, y: (e.clientY - box.top) * scale };
  }

  down(e) {
    if (!this.canvas.width || e.button > 0) return;
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (!this.last) return;
    const next = this.point(e);
    this.stroke(this.last, next);
    this.last = next;
  }

  stroke(from, to) {
    const ctx = this.ctx;
    ctx.strokeStyle = 'rgb(255, 40, 90)';
    ctx.lineCap = 'round';
    ctx.lineJoin = 'round';
    ctx.lineWidth = Number(this.brushInput.value) * this.scale();
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    if (!this.painted) {
      this.painted = true;
      this.onchange();
    }
  }

  // An uploaded mask file: white (light) pixels become painted ones, so it can be touched up.
  async load(file) {
    const bitmap = await createImageBitmap(file);
    const { width, height } = this.canvas;
    const scratch = new OffscreenCanvas(width, height);
    const sctx = scratch.getContext('2d');
    sctx.drawImage(bitmap, 0, 0, width, height);
    const pixels = sctx.getImageData(0, 0, width, height);
    const data = pixels.data;
    let any = false;
    for (let i = 0; i < data.length; i += 4) {
      const light = (data[i] + data[i + 1] + data[i + 2]) / 3 > 127;
      data[i] = 255;
      data[i + 1] = 40;
      data[i + 2] = 90;
      data[i + 3] = light ? 255 : 0;
      any ||= light;
    }
    this.ctx.putImageData(pixels, 0, 0);
    this.painted = any;
    this.onchange();
  }

  // The mask as the server wants it: a PNG, white where the image is to be repainted, black
  // elsewhere.
  async toBlob() {
    const { width, height } = this.canvas;
    const white = new OffscreenCanvas(width, height);
    const wctx = white.getContext('2d');
    wctx.drawImage(this.canvas, 0, 0);
    wctx.globalCompositeOperation = 'source-in'; // keep the strokes' shape, make them white
    wctx.fillStyle = '#fff';
    wctx.fillRect(0, 0, width, height);
    const mask = new OffscreenCanvas(width, height);
    const mctx = mask.getContext('2d');
    mctx.fillStyle = '#000';
    mctx.fillRect(0, 0, width, height);
    mctx.drawImage(white, 0, 0);
    return mask.convertToBlob({ type: 'image/png' });
  }
}
