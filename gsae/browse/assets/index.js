const rows = DATA.rows, cols = ["group","latent","frequency","peak layer","layer spread",
  "mean layer","max activation"];
let sortCol = 2, sortDesc = true, page = 0, group = "";
const PER = 100;
const DECIMAL = [2, 4, 5, 6];  // frequency, spread, mean layer, max activation: 3 digits
function fmt(v, i){ return v === null ? "–" : (DECIMAL.includes(i) ? Number(v).toPrecision(3)
  : String(v)); }
function cmp(a, b){ const x = a[sortCol], y = b[sortCol];
  if (x === null && y === null) return a[1] - b[1]; if (x === null) return 1; if (y === null) return -1;
  const c = x < y ? -1 : x > y ? 1 : 0; return (sortDesc ? -c : c) || a[1] - b[1]; }
function draw(){
  const shown = rows.filter(r => !group || r[0] === group).sort(cmp);
  const pages = Math.max(1, Math.ceil(shown.length / PER)); page = Math.min(page, pages - 1);
  const head = "<tr>" + cols.map((c, i) => `<th data-col="${i}" class="${i === sortCol ?
    "sorted" : ""}">${c}${i === sortCol ? (sortDesc ? " ▼" : " ▲") : ""}</th>`).join("") + "</tr>";
  const body = shown.slice(page * PER, (page + 1) * PER).map(r => `<tr class="row"><td>${r[0]}</td>
    <td><a class="latent" href="latent.html#${encodeURIComponent(r[0])}/${r[1]}">${r[1]}</a></td>`
    + r.slice(2).map((v, j) => `<td>${fmt(v, j + 2)}</td>`).join("") + "</tr>").join("");
  document.getElementById("table").innerHTML = head + body;
  document.getElementById("page").textContent = `page ${page + 1} of ${pages} (${shown.length} latents)`;
  document.querySelectorAll("th").forEach(th => th.onclick = () => {
    const c = +th.dataset.col; if (c === sortCol) sortDesc = !sortDesc;
    else { sortCol = c; sortDesc = c >= 2; } page = 0; draw(); });
}
const sel = document.getElementById("group");
DATA.site.groups.forEach(g => { const o = document.createElement("option"); o.value = g;
  o.textContent = g; sel.appendChild(o); });
sel.onchange = () => { group = sel.value; page = 0; draw(); };
document.getElementById("prev").onclick = () => { page = Math.max(0, page - 1); draw(); };
document.getElementById("next").onclick = () => { page += 1; draw(); };
draw();
