# Chart of bench/run's medians: server CPU per operation (log scale) and RSS
# per idle connection, duplex vs node ws vs python websockets.
#   gnuplot -e "dir='bench/results'" bench/chart.gp
# reads dir/chart_cpu.dat and dir/chart_rss.dat (written by bench/run: a
# quoted label, then one column per server) and writes dir/chart.png.
if (!exists("dir")) dir = "bench/results"

if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) {
  set terminal pngcairo size 1400,620 font "sans,10"
} else {
  set terminal png size 1400,620
}
set output dir."/chart.png"

set style data histogram
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set key top left
set xtics nomirror scale 0 font ",9"
set datafile missing "NaN"
duplex = "#2b6cb0"; node = "#48a56a"; python = "#d69e2e"

set multiplot
set bmargin 4

set size 0.76,1
set origin 0,0
set title "server CPU per operation, µs (log scale; medians; lower is better)"
set logscale y
set format y "%g"
plot dir."/chart_cpu.dat" using 2:xticlabels(1) title "duplex" lc rgb duplex, \
     "" using 3 title "node ws" lc rgb node, \
     "" using 4 title "python websockets" lc rgb python

set size 0.24,1
set origin 0.76,0
set title "RSS per idle connection, KiB\n(dashed: duplex's target)"
unset logscale y
set yrange [0:*]
set key top left
set arrow 1 from graph 0, first 2 to graph 1, first 2 nohead dt 2 lw 1.5 lc rgb "#c53030"
plot dir."/chart_rss.dat" using 2:xticlabels(1) title "duplex" lc rgb duplex, \
     "" using 3 title "node ws" lc rgb node, \
     "" using 4 title "python" lc rgb python

unset multiplot
