# Chart of bench/run's medians: server CPU per operation (log scale) and RSS
# per idle connection, duplex vs its peers.
#   gnuplot -e "dir='bench/results'; servers='duplex uws lws node python'" bench/chart.gp
# reads dir/chart_cpu.dat and dir/chart_rss.dat (written by bench/run: a
# quoted label, then one column per server, in the order of `servers`, the
# ones that ran) and writes dir/chart.png.
if (!exists("dir")) dir = "bench/results"
if (!exists("servers")) servers = "duplex node python"

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
# a colour and a legend name per server id; unknown ids get grey
colour(id) = id eq "duplex" ? "#2b6cb0" : id eq "uws" ? "#805ad5" : id eq "lws" ? "#319795" : \
             id eq "node" ? "#48a56a" : id eq "python" ? "#d69e2e" : "#718096"
label(id) = id eq "uws" ? "uWebSockets" : id eq "lws" ? "libwebsockets" : id eq "node" ? "node ws" : \
            id eq "python" ? "python websockets" : id
n = words(servers)

set multiplot
set bmargin 4

set size 0.76,1
set origin 0,0
set title "server CPU per operation, µs (log scale; medians; lower is better)"
set logscale y
set format y "%g"
plot for [i=1:n] dir."/chart_cpu.dat" using (column(i + 1)):xticlabels(1) title label(word(servers, i)) \
     lc rgb colour(word(servers, i))

# bench/run --only without an idle scenario: no RSS panel (an empty plot is
# an error to gnuplot)
if (!exists("rss") || rss) {
  set size 0.24,1
  set origin 0.76,0
  set title "RSS per idle connection, KiB\n(dashed: duplex's target)"
  unset logscale y
  set yrange [0:*]
  # same colours as on the left; a second legend would cover the bars
  unset key
  set arrow 1 from graph 0, first 2 to graph 1, first 2 nohead dt 2 lw 1.5 lc rgb "#c53030"
  plot for [i=1:n] dir."/chart_rss.dat" using (column(i + 1)):xticlabels(1) title label(word(servers, i)) \
       lc rgb colour(word(servers, i))
}

unset multiplot
