const SITE = DATA.site, shards = {};
function gsaeShard(group, records){ Object.assign(shards[group] = shards[group] || {}, records); }
function esc(s){ return s.replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c])); }
function load(src, then){ const s = document.createElement("script"); s.src = src; s.onload = then;
  s.onerror = () => { document.getElementById("main").textContent = "cannot read " + src; };
  document.head.appendChild(s); }
function context(ex, scale){
  const [layer, value, where, toks, acts] = ex;
  const spans = toks.map((t, j) => { const a = acts[j], on = a > 0, alpha = on ? Math.min(1, 0.15 + 0.85 * a / scale) : 0;
    return `<span class="tok${on ? " on" : ""}" title="${on ? a : 0}" style="background:rgba(255,120,0,${alpha.toFixed(3)})">${esc(t)}</span>`; }).join("");
  return `<div class="ctx" data-layer="${layer}"><span class="layer">layer ${layer} · ${value}</span>${spans}</div>`;
}
function bars(id, values, labels, peak, title){
  const n = values.length, bw = Math.min(48, 560 / Math.max(1, n)), w = bw * n, h = 120;
  const max = Math.max(1, ...values);
  const rects = values.map((v, i) => `<rect class="${i === peak ? "peak" : ""}" x="${(i * bw + 1).toFixed(1)}"
    y="${(h - 18 - (h - 24) * v / max).toFixed(1)}" width="${Math.max(1, bw - 2).toFixed(1)}"
    height="${((h - 24) * v / max).toFixed(1)}"><title>${labels[i]}: ${v}</title></rect>`).join("");
  const ticks = labels.map((l, i) => (n <= 16 || i % Math.ceil(n / 8) === 0) ?
    `<text x="${(i * bw + bw / 2).toFixed(1)}" y="${h - 4}" font-size="10" text-anchor="middle">${l}</text>` : "").join("");
  document.getElementById(id).innerHTML = `<div class="note">${title}</div><svg class="bars" width="${w}" height="${h}">${rects}${ticks}</svg>`;
}
function show(){
  const [group, id] = decodeURIComponent(location.hash.slice(1)).split("/");
  const g = SITE.groups.indexOf(group), i = parseInt(id, 10);
  if (g < 0 || !(i >= 0)) { document.getElementById("main").textContent = "no such latent: " + location.hash; return; }
  const file = `data/${g}/${Math.floor(i / SITE.shard)}.js`;
  const go = () => draw(shards[group][i]);
  if (shards[group] && shards[group][i]) go(); else load(file, go);
}
function draw(r){
  document.title = `${r.g} latent ${r.i}`;
  document.getElementById("title").textContent = `${r.g} · latent ${r.i}`;
  const stats = [["fired on", `${r.fired} of ${r.tokens.reduce((a, b) => a + b, 0)} (token, layer) pairs`],
    ["frequency", r.freq], ["peak layer", r.peak ?? "–"], ["mean layer", r.mean_layer ?? "–"],
    ["layer spread", r.spread === null ? "–" : r.spread + " (effective number of layers)"],
    ["mean activation", r.mean_act ?? "–"], ["max activation", r.max_act ?? "–"]];
  document.getElementById("stats").innerHTML = stats.map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("");
  bars("layers", r.per_layer, r.layers.map(String), r.layers.indexOf(r.peak),
       "firings at each layer of the group (peak in orange)");
  let lo = r.hist.findIndex(c => c > 0), hi = r.hist.length - 1 - [...r.hist].reverse().findIndex(c => c > 0);
  if (lo < 0) { lo = 0; hi = -1; }
  bars("hist", r.hist.slice(lo, hi + 1), SITE.hist_edges.slice(lo, hi + 1).map(String), -1,
       "activation histogram (log bins; label: bin start)");
  const scale = r.max_act || 1;
  document.getElementById("top").innerHTML = r.top.length ? r.top.map(e => context(e, scale)).join("") : "<p class='note'>never fired</p>";
  document.getElementById("random").innerHTML = r.random.map(e => context(e, scale)).join("");
  document.getElementById("neighbours").innerHTML = r.neighbours.map(([j, c]) =>
    `<li><a class="neighbour" href="#${encodeURIComponent(r.g)}/${j}">latent ${j}</a> cosine ${c}</li>`).join("");
  document.getElementById("baseline").innerHTML = r.baseline.length ? "<tr><th>layer</th><th>by cosine</th><th>cosine</th><th>by Jaccard</th><th>Jaccard</th></tr>" +
    r.baseline.map(([l, jc, c, jj, jac]) => `<tr><td>${l}</td><td>${jc}</td><td>${c}</td><td>${jj ?? "–"}</td><td>${jac ?? "–"}</td></tr>`).join("")
    : `<tr><td class="note">no --baseline</td></tr>`;
  window.scrollTo(0, 0);
}
window.addEventListener("hashchange", show);
show();
